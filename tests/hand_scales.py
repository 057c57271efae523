"""TensorScales computed by hand from a range, shared by the scales-file and QDQ export tests.

Importable by plain name: tests/conftest.py puts tests/ on sys.path (pytest's default
``prepend`` import mode).
"""

from __future__ import annotations

import torch

from qcal_export.spec.formats import get_format
from qcal_export.spec.granularity import PerAxis, PerTensor
from qcal_export.spec.scales import TensorScales


def scales_from_range(
    name: str,
    kind: str,
    fmt_name: str,
    method: str,
    axis: int | None,
    amin: torch.Tensor,
    amax: torch.Tensor,
    **extra,
) -> TensorScales:
    """The format's scale and zero point for the range [amin, amax] (per tensor, or per index of
    ``axis``), as TensorScales; ``extra`` sets further fields (options, notes)."""
    fmt = get_format(fmt_name)
    scale, zero_point = fmt.scale_zero_point(amin, amax)
    return TensorScales(
        name=name,
        kind=kind,
        format=fmt_name,
        method=method,
        granularity=PerTensor() if axis is None else PerAxis(axis),
        amax=torch.maximum(amin.abs(), amax.abs()),
        scale=scale,
        zero_point=zero_point,
        min=None if fmt.symmetric else amin,
        max=None if fmt.symmetric else amax,
        **extra,
    )
