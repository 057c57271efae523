"""MSE calibrator: sweep amax candidates ``amax0 * m`` and keep the one with least error.

Multipliers are ``m = start + i * step`` for ``i < ceil((stop - start) / step) + 1``. ``collect``
adds, per group and candidate, the summed error between ``x`` and its fake-quantized copy;
``compute_amax`` takes the candidate with the smallest accumulated loss (the first on ties).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch

from qcal_export.calibrators import kernels
from qcal_export.calibrators.base import Calibrator, MergeOp
from qcal_export.calibrators.bucket_sweep import MIN_VALUES, bucket_losses
from qcal_export.calibrators.cpu_sweep import TILE_ELEMENTS, split_zeros, tiles
from qcal_export.errors import CalibrationError
from qcal_export.spec.choices import NonFinite
from qcal_export.spec.formats import Format
from qcal_export.spec.granularity import Granularity, PerBlock, PerTensorGroup

QuantFunc = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ErrorFunc = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse_multipliers(start: float = 0.25, stop: float = 4.0, step: float = 0.1) -> torch.Tensor:
    """Float64 multipliers ``start + i * step``, ``ceil((stop - start) / step) + 1`` of them."""
    finite = all(math.isfinite(v) for v in (start, stop, step))
    if not finite or step <= 0 or start <= 0 or stop < start:
        raise CalibrationError(
            "mse multipliers need finite 0 < start <= stop and step > 0 "
            f"(got {start}, {stop}, {step})"
        )
    steps = round((stop - start) / step, 9)
    if not math.isfinite(steps):
        raise CalibrationError(f"mse step {step} gives more multipliers than can be counted")
    count = math.ceil(steps) + 1
    return start + step * torch.arange(count, dtype=torch.float64)


class MseCalibrator(Calibrator):
    """Amax search over multiples of an initial range, scoring every candidate per group.

    With a block format (nvfp4) the candidates are global amaxes, each block's scale is
    computed from the block inside the fake-quantization, and the granularity must be
    ``PerTensorGroup(axis, block_size)``.

    ``amax0`` (and ``amin0`` for asymmetric formats) has the export shape; it is given, or set
    later by ``set_initial_range`` from a max pass. ``quant_func(x, amax)`` replaces the
    format's fake-quantization (``x`` in its own shape, ``amax`` of export shape) and
    ``error_func(x, xq)`` the elementwise squared error; both must broadcast.
    """

    merge_ops: ClassVar[dict[str, MergeOp]] = {
        **Calibrator.merge_ops,
        "amin0": "same",
        "amax0": "same",
        "losses": "sum",
    }

    def __init__(
        self,
        fmt: Format,
        granularity: Granularity,
        *,
        amax0: torch.Tensor | float | None = None,
        amin0: torch.Tensor | float | None = None,
        start: float = 0.25,
        stop: float = 4.0,
        step: float = 0.1,
        quant_func: QuantFunc | None = None,
        error_func: ErrorFunc | None = None,
        nonfinite: NonFinite = NonFinite.SKIP,
    ):
        if quant_func is not None and not fmt.symmetric:
            raise CalibrationError(
                f"quant_func takes an amax: use it with a symmetric format, not {fmt.name}"
            )
        if fmt.block_size > 1 and not (
            isinstance(granularity, PerTensorGroup) and granularity.size == fmt.block_size
        ):
            raise CalibrationError(
                f"mse with {fmt.name} sweeps the global amax: use "
                f"PerTensorGroup(axis, {fmt.block_size}), not {granularity.describe()}"
            )
        self.multipliers = mse_multipliers(start, stop, step)
        self._grid = self.multipliers[:, None]
        self.quant_func = quant_func
        self.error_func = error_func
        self.amin0: torch.Tensor | None = None
        self.amax0: torch.Tensor | None = None
        super().__init__(fmt, granularity, nonfinite=nonfinite)
        if amax0 is not None:
            self.set_initial_range(amin0, amax0)

    @classmethod
    def granularity_for(cls, fmt: Format, granularity: Granularity) -> Granularity:
        """Block formats: one global amax over the tensor's blocks of ``fmt.block_size``."""
        if fmt.block_size > 1 and isinstance(granularity, PerBlock | PerTensorGroup):
            return PerTensorGroup(granularity.axis, fmt.block_size)
        return granularity

    @property
    def needs_initial_range(self) -> bool:
        return self.amax0 is None

    def set_initial_range(
        self, amin0: torch.Tensor | float | None, amax0: torch.Tensor | float
    ) -> None:
        """Set the range the candidates multiply; ``amin0`` defaults to ``-amax0``."""
        if self._state:
            raise CalibrationError("set the initial range before collecting, or reset() first")
        amax0 = torch.as_tensor(amax0, dtype=torch.float32)
        if self.fmt.symmetric or amin0 is None:
            amax0 = (
                amax0.abs()
                if amin0 is None
                else torch.maximum(amax0.abs(), torch.as_tensor(amin0).abs())
            )
            amin0 = -amax0
        self.amin0 = torch.as_tensor(amin0, dtype=torch.float32).clone()
        self.amax0 = amax0.clone()

    def _init_state(self, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.amax0 is None:
            raise CalibrationError(
                "MseCalibrator needs an initial range: pass amax0 or run a max pass and call "
                "set_initial_range() before collect()"
            )
        num, device = groups.shape[0], groups.device
        if self.amax0.numel() not in (1, num):
            raise CalibrationError(
                f"initial range of shape {tuple(self.amax0.shape)} does not fit {num} "
                f"{self.granularity.describe()} groups of the collected tensor"
            )
        flatten = self.granularity.flatten
        amin0 = flatten(self.amin0.to(device)).expand(num).contiguous()
        amax0 = flatten(self.amax0.to(device)).expand(num).contiguous()
        losses = torch.zeros(num, len(self.multipliers), dtype=torch.float64, device=device)
        return {"amin0": amin0, "amax0": amax0, "losses": losses}

    def _candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate (min, max) per candidate and group, each ``[K, G]`` float32.

        Clamped to float32's range: an overflowing candidate (amax0 near 3.4e38) would give an
        infinite scale, a NaN loss and an infinite amax; clamped, it ties with the largest.
        """
        device = self._state["amax0"].device
        if self._grid.device != device:  # copied once, not on every collect (a host sync)
            self._grid = self.multipliers.to(device)[:, None]
        m = self._grid
        limit = torch.finfo(torch.float32).max
        amin = (self._state["amin0"].double()[None] * m).clamp(-limit, limit).float()
        amax = (self._state["amax0"].double()[None] * m).clamp(-limit, limit).float()
        return amin, amax

    def _update(self, x: torch.Tensor, groups: torch.Tensor) -> None:
        if self.quant_func is not None:
            self._update_custom(x)
            return
        scale, zero_point = self.fmt.scale_zero_point(*self._candidates())
        if self._fused(groups):
            self._update_fused(groups, scale, zero_point)
            return
        self._sweep(groups, scale[:, :, None], zero_point[:, :, None])

    def _sweep(self, groups: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Torch sweep: every candidate on cache-sized tiles of ``groups``, the values that all
        candidates quantize to 0 set apart (their error ``x ** 2`` is added once per candidate).

        ``scale``, ``zero_point`` ``[K, G, 1]``.
        """
        losses = self._state["losses"]
        if self._buckets(groups):
            losses += bucket_losses(self.fmt, groups[0], scale[:, 0, 0], zero_point[:, 0, 0])
            return
        split = None if self.error_func is not None else split_zeros(self.fmt, groups, scale)
        if split is not None:
            groups, zeros = split
            losses += zeros.double().square_().sum()
        num_cand, block = scale.shape[0], self.fmt.block_size
        per_tile = max(TILE_ELEMENTS // num_cand, block)
        size = num_cand * min(per_tile, groups.numel())
        scratch = torch.empty(size, device=groups.device)
        wide = torch.empty(size, dtype=torch.float64, device=groups.device)
        for rows, cols in tiles(*groups.shape, per_tile, block):
            xc = groups[rows, cols]
            xq = scratch[: num_cand * xc.numel()].view(num_cand, *xc.shape)
            self.fmt.fake_quant_into(xq, xc, scale[:, rows], zero_point[:, rows])
            losses[rows] += self._error(xc, xq, wide[: xq.numel()].view(xq.shape)).T

    def _buckets(self, groups: torch.Tensor) -> bool:
        """Whether ``bucket_losses`` scores ``groups``: one large group on the CPU, the format's
        own squared error, one scale per group."""
        return (
            groups.shape[0] == 1
            and groups.shape[1] >= MIN_VALUES
            and not groups.is_cuda
            and self.error_func is None
            and self.fmt.block_size == 1
        )

    def _fused(self, groups: torch.Tensor) -> bool:
        """Whether a Triton sweep scores ``groups``: CUDA, Triton, the format's own QDQ and
        squared error (int or fp8 per tensor, axis or block; nvfp4's global amax)."""
        return (
            groups.is_cuda
            and kernels.HAS_TRITON
            and self.quant_func is None
            and self.error_func is None
        )

    def _skips_nonfinite(self, x: torch.Tensor) -> bool:
        """The int and fp8 sweep kernels read a non-finite value as 0."""
        return self._fused(x) and not self.fmt.two_level

    def _update_fused(
        self, groups: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> None:
        if self.fmt.two_level:
            from qcal_export.calibrators.kernels.nvfp4_global import nvfp4_global_sweep_

            nvfp4_global_sweep_(self._state["losses"], groups, scale, self.fmt)
            return
        from qcal_export.calibrators.kernels.mse_sweep import mse_sweep_

        mse_sweep_(self._state["losses"], groups, scale, zero_point, self.fmt)

    def _update_custom(self, x: torch.Tensor) -> None:
        """One full pass per candidate: a user quant_func is not vectorized over candidates."""
        _, amax = self._candidates()
        shape, groups = self.stat_shape, self.granularity.groups
        x_groups = groups(x)
        for k in range(amax.shape[0]):
            xq = self.quant_func(x, self.granularity.unflatten(amax[k], shape))
            self._state["losses"][:, k] += self._error(x_groups, groups(xq))

    def _error(
        self, x: torch.Tensor, xq: torch.Tensor, wide: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Summed error over the last axis, in float64 (exact differences, no cancellation);
        ``wide`` is a float64 scratch of ``xq``'s shape, reused across chunks."""
        if self.error_func is not None:
            return self.error_func(x, xq).sum(-1, dtype=torch.float64)
        wide = xq.double() if wide is None else wide.copy_(xq)
        return wide.sub_(x).square_().sum(-1)

    def _decide(self) -> tuple[torch.Tensor, torch.Tensor]:
        best = self._state["losses"].argmin(dim=1)
        amin, amax = self._candidates()
        index = best[None]
        return amin.gather(0, index)[0], amax.gather(0, index)[0]
