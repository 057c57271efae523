"""ONNX models in and out: load and save (external data, atomically), onnx's checker, and
initializers read as tensors."""
