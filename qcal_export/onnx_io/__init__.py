"""ONNX models in and out: load and save (external data, atomically), the weight store that
keeps large initializers out of the proto, onnx's checker, and initializers read as tensors."""
