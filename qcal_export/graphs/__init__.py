"""Graph edits, each a pass over an in-memory copy of the model: pre-processing, the plan of
what is quantized (targets, placement), Q/DQ insertion, NVFP4, smoothing, switchable models."""
