"""Calibration data in, activations out: readers for every data form, streamed batch by batch,
and the captures (ONNX Runtime sessions, IOBinding, torch forward hooks)."""
