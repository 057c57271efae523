"""Is the written model right? Its outputs against the float model's in ONNX Runtime and a
reference, the runtime's own faults, the verdict, the user's metric and what deployment buys."""
