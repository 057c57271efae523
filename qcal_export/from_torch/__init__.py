"""Calibrate a torch model with forward hooks and export it as a QDQ ONNX model: the module to
node mapping and the export."""
