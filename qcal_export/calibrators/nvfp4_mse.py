"""NVFP4 per-block FP8-scale sweep: for each block of 16, the best of the 126 FP8 E4M3 scales.

Candidates are the 126 positive finite FP8 E4M3 values ``s`` (times the FP32 global scale), so a
block's amax candidates are ``global_amax * s / 448``. The error is plain squared error or,
given ``hessian`` ``[num_blocks_along_axis, 16, 16]``, the Hessian-weighted ``dwᵀ H dw``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from qcal_export.calibrators import kernels
from qcal_export.calibrators.base import Calibrator, MergeOp
from qcal_export.errors import CalibrationError
from qcal_export.spec.choices import NonFinite
from qcal_export.spec.formats import NVFP4, NVFP4Format
from qcal_export.spec.granularity import PerBlock

WEIGHT_BLOCKS = PerBlock(-1, 16)
"""Blocks of 16 along the last axis: the input channels of a ``[cout, cin]`` weight."""

CHUNK_ELEMENTS = 1 << 21
"""Candidates x blocks x 16 scored at once: bounds the sweep's scratch memory."""


def fp8_scale_candidates(device: torch.device | str | None = None) -> torch.Tensor:
    """The 126 positive finite FP8 E4M3FN values, ascending (codes 0x01 to 0x7E), as float8:
    candidate ``k`` has code ``k + 1``. Made on ``device`` (no host copy)."""
    return torch.arange(1, 127, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)


class NVFP4MseCalibrator(Calibrator):
    """Per-block FP8 scale search for NVFP4 weights (blocks of 16 along ``axis``).

    ``global_amax`` is given or set by ``set_initial_range`` from a max pass; ``compute_amax``
    returns the per-block amax of the winning scale, ``compute_block_scales`` the FP8 scales.

    On CUDA with Triton the first ``collect`` only finds each block's best candidate
    (``kernels/nvfp4_best.py``: the candidates that can still win, float64 for near ties) and
    keeps a copy of the blocks; the 126 losses per block (``[G, 126]`` float64: 1008 bytes for
    every 16 weights) are computed only when something needs them (``state_dict``, ``snapshot``,
    ``merge_`` or a second ``collect``), by the fused full sweep (``kernels/nvfp4_sweep.py``:
    losses within a relative 2^-18, float64 for near ties), stored candidate-major (a
    transposed view, same shape). Both give the torch path's choices.
    """

    merge_ops: ClassVar[dict[str, MergeOp]] = {
        **Calibrator.merge_ops,
        "global_amax": "same",
        "losses": "sum",
    }
    host_nonfinite_check: ClassVar[bool] = True
    """A weight is collected once and the pruned choice waits for the device anyway, so the
    device-side count gains nothing here (``benchmarks/results/design_notes.md``)."""

    def __init__(
        self,
        fmt: NVFP4Format = NVFP4,
        granularity: PerBlock = WEIGHT_BLOCKS,
        *,
        global_amax: torch.Tensor | float | None = None,
        hessian: torch.Tensor | None = None,
        nonfinite: NonFinite = NonFinite.SKIP,
    ):
        if not isinstance(granularity, PerBlock) or granularity.size != fmt.block_size:
            raise CalibrationError(
                f"nvfp4-mse needs PerBlock(axis, {fmt.block_size}), not {granularity}"
            )
        if hessian is not None and tuple(hessian.shape[1:]) != (fmt.block_size, fmt.block_size):
            raise CalibrationError(
                f"hessian must be [num_blocks, 16, 16], not {tuple(hessian.shape)}"
            )
        self.hessian = None if hessian is None else hessian.to(torch.float64)
        self.global_amax = (
            None if global_amax is None else torch.as_tensor(global_amax, dtype=torch.float32)
        )
        super().__init__(fmt, granularity, nonfinite=nonfinite)

    def reset(self) -> None:
        super().reset()
        self._best: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._materialize()
        return super().state_dict()

    def snapshot(self) -> dict[str, torch.Tensor]:
        self._materialize()
        return super().snapshot()

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        super().restore(snapshot)
        self._best = None
        self._pending = None

    def merge_(self, state: dict[str, torch.Tensor]) -> None:
        self._materialize()
        super().merge_(state)
        self._best = None

    @property
    def needs_initial_range(self) -> bool:
        return self.global_amax is None

    def set_initial_range(self, amin0: torch.Tensor | None, amax0: torch.Tensor) -> None:
        """Take the global amax from a max pass's (min, max)."""
        bound = torch.as_tensor(amax0).abs().max()
        if amin0 is not None:
            bound = torch.maximum(bound, torch.as_tensor(amin0).abs().max())
        self.global_amax = bound.to(torch.float32)

    def _init_state(self, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.global_amax is None:
            raise CalibrationError("nvfp4-mse needs global_amax: pass it or run a max pass first")
        state = {"global_amax": self.global_amax.to(groups.device).clone()}
        if not self._fused(groups):  # the fused path adds losses when they are needed
            shape = (groups.shape[0], 126)
            state["losses"] = torch.zeros(shape, dtype=torch.float64, device=groups.device)
        return state

    def _candidate_scales(self) -> torch.Tensor:
        """Float32 effective scales (FP8 value x global scale) per candidate, ``[126]``."""
        global_scale = self.fmt.global_scale(self._state["global_amax"])
        candidates = fp8_scale_candidates(global_scale.device)
        return self.fmt.effective_scales(candidates, global_scale)

    def _fused(self, groups: torch.Tensor) -> bool:
        """Whether the Triton sweep scores ``groups``: CUDA and Triton."""
        return groups.is_cuda and kernels.HAS_TRITON

    def _input_dtype(self, x: torch.Tensor) -> torch.dtype:
        """As for any fused calibrator, except fp16 with a Hessian, widened to float32
        (exactly): Triton compiles the fp16 Hessian kernels far slower than the bf16 and float32
        ones (figures in benchmarks/results/design_notes.md)."""
        if x.dtype == torch.float16 and self.hessian is not None:
            return torch.float32
        return super()._input_dtype(x)

    def _update(self, x: torch.Tensor, groups: torch.Tensor) -> None:
        hessian = self._row_hessian()
        if self._fused(groups):
            self._update_fused(groups, hessian)
            return
        self._best = None
        scales = self._candidate_scales()[:, None, None]
        chunk = max(1, CHUNK_ELEMENTS // (scales.shape[0] * self.fmt.block_size))
        losses = self._state["losses"]
        for begin in range(0, groups.shape[0], chunk):
            blocks = groups[begin : begin + chunk]
            diff = self.fmt.fake_quant_blocks(blocks, scales).double().sub_(blocks)
            if hessian is None:
                error = diff.square_().sum(-1)
            else:
                index = torch.arange(begin, begin + len(blocks), device=hessian.device)
                h = hessian[index % hessian.shape[0]]
                error = torch.einsum("kgi,gij,kgj->kg", diff, h, diff)
            losses[begin : begin + chunk] += error.T

    def _update_fused(self, groups: torch.Tensor, hessian: torch.Tensor | None) -> None:
        from qcal_export.calibrators.kernels.nvfp4_best import nvfp4_best_scales
        from qcal_export.calibrators.kernels.nvfp4_sweep import nvfp4_scale_sweep

        if "losses" not in self._state and self._pending is None:
            self._pending = groups.contiguous().clone()
            self._best = nvfp4_best_scales(groups, self._candidate_scales(), hessian)[0]
            return
        self._materialize()
        self._state["losses"] += nvfp4_scale_sweep(groups, self._candidate_scales(), hessian)[0].T
        self._best = None

    def _materialize(self) -> None:
        """Score every candidate of the blocks the first fused collect only chose for."""
        if self._pending is None:
            return
        from qcal_export.calibrators.kernels.nvfp4_sweep import nvfp4_scale_sweep

        blocks, self._pending = self._pending, None
        losses = torch.empty(126, blocks.shape[0], dtype=torch.float64, device=blocks.device)
        nvfp4_scale_sweep(blocks, self._candidate_scales(), self._row_hessian(), losses)
        self._state["losses"] = losses.T

    def _row_hessian(self) -> torch.Tensor | None:
        """``H`` of the blocks along the axis, ``[blocks_per_row, 16, 16]``: block g uses
        ``H[g % blocks_per_row]`` (blocks are ordered with the axis last)."""
        if self.hessian is None:
            return None
        per_row = self.stat_shape[self.granularity.axis]
        if self.hessian.shape[0] != per_row:
            raise CalibrationError(
                f"hessian has {self.hessian.shape[0]} blocks, the tensor {per_row} along axis "
                f"{self.granularity.axis}"
            )
        return self.hessian.to(self._state["global_amax"].device)

    def compute_block_scales(self) -> torch.Tensor | None:
        """The winning FP8 block scales (``float8_e4m3fn``) in export shape."""
        if not self._state:
            return None
        codes = (self._best_candidates() + 1).to(torch.uint8)  # candidate k is FP8 code k + 1
        return self.granularity.unflatten(codes, self.stat_shape).view(torch.float8_e4m3fn)

    def compute_global_amax(self) -> torch.Tensor | None:
        """The global amax the candidates were scaled by."""
        return self._state["global_amax"].clone() if self._state else None

    def _best_candidates(self) -> torch.Tensor:
        """Per group, the index of the candidate with the least loss (the first on ties)."""
        return self._best if self._best is not None else self._state["losses"].argmin(dim=1)

    def _decide(self) -> tuple[torch.Tensor, torch.Tensor]:
        best = self._best_candidates()
        amax = self._candidate_scales()[best] * self.fmt.qmax
        return -amax, amax
