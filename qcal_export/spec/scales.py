"""A tensor's calibrated scales: what calibration decides (``TensorScales``) and what the export
writes into the graph (``QParams``); values only, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from qcal_export.spec.formats import Format, get_format
from qcal_export.spec.granularity import Granularity


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of export shape for one tensor, with its format and granularity;
    ``global_scale`` for two-level formats (nvfp4)."""

    fmt: Format
    scale: torch.Tensor
    zero_point: torch.Tensor
    granularity: Granularity
    global_scale: torch.Tensor | None = None


@dataclass
class TensorScales:
    """Calibration result of one tensor; all tensors have the export (ONNX scale) shape.

    ``amax`` is ``max(|min|, |max|)``; asymmetric formats also keep the range ``min`` / ``max``.
    NVFP4 weights: ``amax`` per block, ``scale`` the FP8 block scales (float32 values) and
    ``global_scale`` the FP32 global scale; NVFP4 activations: ``amax`` the global amax and
    ``scale`` = ``global_scale`` (block scales are computed in the graph).
    """

    name: str
    kind: Literal["activation", "weight"]
    format: str
    method: str
    granularity: Granularity
    amax: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    min: torch.Tensor | None = None
    max: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def axis(self) -> int | None:
        return getattr(self.granularity, "axis", None)

    def fake_quant_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight (graph shape) as the exported DequantizeLinear chain gives it, float32."""
        shape, fmt = tuple(weight.shape), get_format(self.format)
        scale = self.granularity.expand(self.scale.to(weight.device), shape)
        if fmt.two_level:
            global_scale = self.global_scale
            if global_scale is not None:
                global_scale = global_scale.to(weight.device)
            return fmt.fake_quant_blocks(weight, fmt.effective_scales(scale, global_scale))
        zero_point = self.granularity.expand(self.zero_point.to(weight.device), shape)
        return fmt.fake_quant(weight, scale, zero_point)

    def qparams(self) -> QParams:
        return QParams(
            get_format(self.format),
            self.scale,
            self.zero_point,
            self.granularity,
            self.global_scale,
        )
