"""Max calibrator: running abs-max, or running min and max for asymmetric formats."""

from __future__ import annotations

from typing import ClassVar

import torch

from qcal_export.calibrators.base import Calibrator, MergeOp


class MaxCalibrator(Calibrator):
    """Running per-group min and max; symmetric formats use ``max(|min|, |max|)``."""

    merge_ops: ClassVar[dict[str, MergeOp]] = {
        **Calibrator.merge_ops,
        "min": "min",
        "max": "max",
    }

    _ranges: tuple[torch.Tensor, torch.Tensor] | None = None
    """Per-group (min, max) of the batch ``_drop_nonfinite`` checked, for ``_update``."""

    def _drop_nonfinite(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | int]:
        """On the CPU the batch's group minima and maxima are the finiteness check: a NaN or an
        infinity makes one of them non-finite (both propagate NaN), so a finite batch, the usual
        case, is read twice instead of three times; any other goes the general way."""
        self._ranges = None
        if x.is_cuda:
            return super()._drop_nonfinite(x)
        groups = self.granularity.groups(x)
        amin, amax = groups.amin(dim=1), groups.amax(dim=1)
        if bool(torch.isfinite(amin).all() and torch.isfinite(amax).all()):
            self._ranges = amin, amax
            return x, 0
        return super()._drop_nonfinite(x)

    def _init_state(self, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        num = groups.shape[0]
        return {
            "min": torch.zeros(num, dtype=torch.float32, device=groups.device),
            "max": torch.zeros(num, dtype=torch.float32, device=groups.device),
        }

    def _update(self, x: torch.Tensor, groups: torch.Tensor) -> None:
        if self._ranges is not None:
            amin, amax = self._ranges
            self._ranges = None
        else:
            amin, amax = groups.amin(dim=1), groups.amax(dim=1)  # faster than aminmax on CPU
        torch.minimum(self._state["min"], amin, out=self._state["min"])
        torch.maximum(self._state["max"], amax, out=self._state["max"])

    def _decide(self) -> tuple[torch.Tensor, torch.Tensor]:
        amin, amax = self._state["min"], self._state["max"]
        if self.fmt.symmetric:
            bound = torch.maximum(amin.abs(), amax)
            return -bound, bound
        return amin.clone(), amax.clone()
