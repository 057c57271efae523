"""Accuracy steps beyond calibrating: the held-out split, smoothing, the per-layer view, method
choice and the precision search for a target."""
