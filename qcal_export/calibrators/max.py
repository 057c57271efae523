"""Max calibrator: running abs-max, or running min and max for asymmetric formats."""

from __future__ import annotations

from typing import ClassVar

import torch

from qcal_export.calibrators.base import Calibrator, MergeOp
from qcal_export.calibrators.ranged import RangedCalibrator


class MaxCalibrator(RangedCalibrator):
    """Running per-group min and max; symmetric formats use ``max(|min|, |max|)``."""

    merge_ops: ClassVar[dict[str, MergeOp]] = {
        **Calibrator.merge_ops,
        "min": "min",
        "max": "max",
    }

    def _init_state(self, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        num = groups.shape[0]
        return {
            "min": torch.zeros(num, dtype=torch.float32, device=groups.device),
            "max": torch.zeros(num, dtype=torch.float32, device=groups.device),
        }

    def _update(self, x: torch.Tensor, groups: torch.Tensor) -> None:
        amin, amax = self.batch_extremes(groups)
        torch.minimum(self._state["min"], amin, out=self._state["min"])
        torch.maximum(self._state["max"], amax, out=self._state["max"])

    def _decide(self) -> tuple[torch.Tensor, torch.Tensor]:
        amin, amax = self._state["min"], self._state["max"]
        if self.fmt.symmetric:
            bound = torch.maximum(amin.abs(), amax)
            return -bound, bound
        return amin.clone(), amax.clone()
