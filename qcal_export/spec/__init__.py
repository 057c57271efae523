"""The vocabulary every stage shares, with no I/O: number formats, granularities, calibration
methods and the fixed choices (each declared once), recipes and their options, the plan of what
is quantized, and a tensor's calibrated scales."""
