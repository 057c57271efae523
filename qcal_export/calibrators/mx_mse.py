"""MX per-block exponent search: for each block of 32, the shared exponent among the spec's
``e = floor(log2(block_amax)) - emax`` and its neighbours ``e - 1`` and ``e + 1`` whose
fake quantization has the least squared error.

``e + 1`` halves every element's resolution but keeps the largest ones from saturating;
``e - 1`` doubles the resolution and clips the largest. Ties go to ``e``, then ``e - 1``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from qcal_export.calibrators.base import Calibrator, MergeOp
from qcal_export.errors import CalibrationError
from qcal_export.spec.choices import NonFinite
from qcal_export.spec.granularity import PerBlock
from qcal_export.spec.mx_formats import MXFormat

OFFSETS = (0, -1, 1)
"""Candidate exponents relative to the spec's, in the order ties are broken."""


class MxMseCalibrator(Calibrator):
    """Per-block exponent search for MX weights (blocks of 32 along ``axis``).

    ``compute_amax`` returns, per block, ``2^(e + emax)``: the amax whose spec exponent is the
    chosen ``e`` (0 for a zero block), so the format's ``scale_zero_point`` gives ``2^e``.
    """

    merge_ops: ClassVar[dict[str, MergeOp]] = {
        **Calibrator.merge_ops,
        "exponent": "same",
        "amax": "max",
        "losses": "sum",
    }

    def __init__(
        self,
        fmt: MXFormat,
        granularity: PerBlock,
        *,
        nonfinite: NonFinite = NonFinite.SKIP,
    ):
        if not isinstance(granularity, PerBlock) or granularity.size != fmt.block_size:
            raise CalibrationError(
                f"mx-mse needs PerBlock(axis, {fmt.block_size}), not {granularity}"
            )
        super().__init__(fmt, granularity, nonfinite=nonfinite)

    def _init_state(self, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        amax = groups.abs().amax(dim=1).to(torch.float32)
        return {
            "exponent": self.fmt.exponent(amax),
            "amax": torch.zeros_like(amax),
            "losses": torch.zeros(
                (groups.shape[0], len(OFFSETS)), dtype=torch.float64, device=groups.device
            ),
        }

    def _candidates(self) -> torch.Tensor:
        """Candidate exponents ``[groups, 3]`` (int32), in OFFSETS order."""
        offsets = torch.tensor(OFFSETS, dtype=torch.int32, device=self._state["exponent"].device)
        return self._state["exponent"][:, None] + offsets

    def _update(self, x: torch.Tensor, groups: torch.Tensor) -> None:
        blocks = groups.to(torch.float32)
        torch.maximum(self._state["amax"], blocks.abs().amax(dim=1), out=self._state["amax"])
        scales = self.fmt.scale_of(self._candidates())
        for k in range(len(OFFSETS)):
            diff = self.fmt.fake_quant(blocks, scales[:, k, None], None).double() - blocks
            self._state["losses"][:, k] += diff.square().sum(dim=1)

    def _decide(self) -> tuple[torch.Tensor, torch.Tensor]:
        best = self._state["losses"].argmin(dim=1)  # the first on ties: OFFSETS' order
        exponent = self._candidates().gather(1, best[:, None])[:, 0]
        amax = self.fmt.scale_of(exponent + self.fmt.emax)
        amax = torch.where(self._state["amax"] > 0, amax, torch.zeros_like(amax))
        return -amax, amax
