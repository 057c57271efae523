"""Scales files for test_scales.py and test_scales_values.py: scales a format computes from a
random tensor's range, and a saved file's raw tensors and header read without the package.
"""

from __future__ import annotations

import json

import torch
from hand_scales import scales_from_range
from safetensors import safe_open

from qcal_export.spec.scales import TensorScales

SHA = "0123456789abcdef" * 4


def calibrated(
    name: str,
    fmt_name: str,
    *,
    axis: int | None = None,
    kind: str = "activation",
    method: str = "max",
    seed: int = 0,
) -> TensorScales:
    """Scales of a random tensor [6, 4] (+0.5 offset: an asymmetric range), as the format
    computes them; per channel of ``axis`` or per tensor."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, generator=gen) * torch.linspace(0.1, 3.0, 6)[:, None] + 0.5
    if axis is None:
        amin, amax = x.min(), x.max()
    else:
        amin, amax = x.movedim(axis, 0).reshape(x.shape[axis], -1).aminmax(dim=1)
    options = {"start": 0.5, "stop": 2.0, "step": 0.25} if method == "mse" else {}
    notes = ["zero range: amax floored to 1e-30"] if seed == 7 else []
    return scales_from_range(
        name, kind, fmt_name, method, axis, amin, amax, options=options, notes=notes
    )


def stored(path) -> tuple[dict[str, torch.Tensor], dict]:
    """The raw tensors and the decoded qcal_export header, read without the package."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["qcal_export"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open)
    return tensors, header
