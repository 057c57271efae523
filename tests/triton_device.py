"""Where the Triton kernel tests run: on CUDA, or with ``TRITON_INTERPRET=1`` and no GPU on
the CPU in Triton's interpreter; skipped otherwise."""

from __future__ import annotations

import os

import pytest
import torch

from qcal_export.calibrators import kernels

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET else "cuda"
MARKS = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (kernels.HAS_TRITON and (torch.cuda.is_available() or INTERPRET)),
        reason="needs CUDA (or TRITON_INTERPRET=1) and Triton",
    ),
]
