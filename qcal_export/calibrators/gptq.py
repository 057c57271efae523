"""GPTQ weight calibration: a calibrator that rounds the weight column by column with error
compensation (``gptq_solve``) on its layer input's full Hessian (``hessian.FullHessian``).

The calibrator decides the scales and the compensated weight together: ``compute_range`` gives
each group's range as GPTQ reached it, ``compensated_weight`` the rounded weight (graph shape),
which the export quantizes again with those scales into exactly GPTQ's codes.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from qcal_export.calibrators.base import Calibrator, MergeOp
from qcal_export.calibrators.gptq_solve import LAZY_BLOCK, PERCDAMP, ColumnGroups, gptq_columns
from qcal_export.errors import CalibrationError
from qcal_export.spec.choices import NonFinite
from qcal_export.spec.formats import SCALE_FLOOR, IntFormat
from qcal_export.spec.granularity import Granularity, PerAxis, PerBlock, PerTensor


class GptqCalibrator(Calibrator):
    """GPTQ for a 2-D weight: collect it once; its scales and its compensated values follow.

    ``hessian`` ``[K, K]``: ``Xᵀ X`` of the layer input, K the weight's ``reduction_axis`` (the
    blocks' axis for block scales). ``percdamp``, ``act_order`` and ``lazy_block`` as
    ``gptq_columns`` takes them; ``scale_floor``: the least scale of the export's scale type.
    """

    merge_ops: ClassVar[dict[str, MergeOp]] = {**Calibrator.merge_ops, "min": "same", "max": "same"}

    def __init__(
        self,
        fmt: IntFormat,
        granularity: Granularity,
        *,
        hessian: torch.Tensor | None = None,
        reduction_axis: int | None = None,
        percdamp: float = PERCDAMP,
        act_order: bool = False,
        lazy_block: int = LAZY_BLOCK,
        scale_floor: float = SCALE_FLOOR,
        nonfinite: NonFinite = NonFinite.SKIP,
    ):
        if not isinstance(granularity, PerTensor | PerAxis | PerBlock):
            raise CalibrationError(
                f"gptq takes per-tensor, per-axis or block scales, not {granularity}"
            )
        self.hessian = hessian
        self.reduction_axis = reduction_axis
        self.percdamp = float(percdamp)
        self.act_order = bool(act_order)
        self.lazy_block = int(lazy_block)
        self.scale_floor = scale_floor
        super().__init__(fmt, granularity, nonfinite=nonfinite)

    def reset(self) -> None:
        super().reset()
        self._compensated: torch.Tensor | None = None
        self._codes: torch.Tensor | None = None

    def _init_state(self, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def _update(self, x: torch.Tensor, groups: torch.Tensor) -> None:
        if "min" in self._state:
            raise CalibrationError("gptq rounds a weight once: collect it in one call")
        if self.hessian is None or x.dim() != 2:
            raise CalibrationError(
                f"gptq needs a 2-D weight and its layer input's Hessian, not a {x.dim()}-D "
                f"weight{'' if self.hessian is not None else ' without one'}"
            )
        axis = self.k_axis
        oriented = x if axis == 1 else x.T
        rows, columns = oriented.shape
        blocks = isinstance(self.granularity, PerBlock)
        groups_of = ColumnGroups(
            self.fmt,
            self.granularity.size if blocks else columns,
            not isinstance(self.granularity, PerTensor),
            rows,
            columns,
            self.scale_floor,
            device=x.device,
        )
        result = gptq_columns(
            oriented,
            self.hessian.to(x.device),
            groups_of,
            self.percdamp,
            self.act_order,
            self.lazy_block,
        )
        self._compensated = result.weight if axis == 1 else result.weight.T
        self._codes = result.codes if axis == 1 else result.codes.T
        amin, amax = groups_of.amin, groups_of.amax
        if blocks and axis == 0:
            amin, amax = amin.T, amax.T
        self._state["min"] = self.granularity.flatten(amin.reshape(self.stat_shape))
        self._state["max"] = self.granularity.flatten(amax.reshape(self.stat_shape))

    @property
    def k_axis(self) -> int:
        """The axis (0 or 1) of the 2-D weight that the Hessian's K runs along: the blocks'
        axis, else ``reduction_axis``."""
        axis = self.granularity.axis if isinstance(self.granularity, PerBlock) else None
        axis = self.reduction_axis if axis is None else axis
        if axis is None:
            raise CalibrationError("gptq needs the weight's reduction axis (reduction_axis)")
        return axis % 2

    def _decide(self) -> tuple[torch.Tensor, torch.Tensor]:
        amin, amax = self._state["min"], self._state["max"]
        if self.fmt.symmetric:
            bound = torch.maximum(amin.abs(), amax.abs())
            return -bound, bound
        return amin.clone(), amax.clone()

    def compensated_weight(self) -> torch.Tensor | None:
        """The weight as GPTQ rounded it (graph shape, float32, dequantized); None before
        collect."""
        return self._compensated

    def codes(self) -> torch.Tensor | None:
        """GPTQ's integer codes (graph shape, the format's storage dtype); None before collect."""
        return self._codes
