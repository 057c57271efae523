"""Fused GPU kernels (Triton) for the calibrators; the torch paths stay the reference and fallback.

``HAS_TRITON`` says whether the kernels can be imported at all; a calibrator uses one only for
CUDA tensors, and imports its module lazily so that a CPU-only install never loads Triton.
"""

from __future__ import annotations

import importlib.util

HAS_TRITON = importlib.util.find_spec("triton") is not None
