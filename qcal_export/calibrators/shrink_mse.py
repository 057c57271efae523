"""Shrink-grid MSE calibrator (observer style): shrink each group's range towards 0, keep the
candidate with the least error, and smooth the winners over batches with a moving average.

Per batch and group: the batch's min and max, extended to include 0; candidates
``(p * min, p * max)`` with ``p = 1 - i / grid`` for ``i in range(int(maxshrink * grid))``; error
``sum |xq - x| ** norm`` over the group. A group's best changes only where a candidate's error is
strictly smaller (the earliest wins ties), and the search ends once ``patience`` consecutive
candidates improved no group. The first batch's winners start the running min/max; each later
batch moves them by ``running += averaging_constant * (winner - running)``.

These are the semantics of llmcompressor's moving-average MSE observer; the numerics are ours: a
candidate range becomes scale and zero point through the format's ``scale_zero_point`` and is
scored with the format's QuantizeLinear -> DequantizeLinear arithmetic (symmetric int8:
``scale = amax / 127``, not 127.5), so the search scores what ONNX Runtime computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch

from qcal_export.calibrators import shrink_cpu
from qcal_export.calibrators.base import Calibrator, MergeOp
from qcal_export.calibrators.cpu_sweep import TILE_ELEMENTS, tiles
from qcal_export.errors import CalibrationError
from qcal_export.spec.choices import NonFinite
from qcal_export.spec.formats import Format
from qcal_export.spec.granularity import Granularity, PerBlock, PerTensorGroup


def shrink_factors(maxshrink: float = 0.2, grid: float = 100) -> torch.Tensor:
    """Float64 ``p = 1 - i / grid`` for ``i in range(int(maxshrink * grid))``, ``[K]``."""
    maxshrink = _number("maxshrink", maxshrink, *_FRACTION)
    grid = _number("grid", grid, *_POSITIVE)
    count = int(maxshrink * grid)
    if count < 1:
        raise CalibrationError(
            f"shrink-mse options maxshrink={maxshrink}, grid={grid} give no candidate: "
            "int(maxshrink * grid) must be at least 1"
        )
    return 1 - torch.arange(count, dtype=torch.float64) / grid


class ShrinkMseCalibrator(Calibrator):
    """Moving average of each group's shrink-searched (min, max), for any format and granularity.

    Two-level formats (nvfp4) take one of two forms. ``PerTensorGroup(axis, 16)``: the global
    amax is shrunk, each block's FP8 scale computed from the block inside the fake-quantization.
    ``PerBlock(axis, 16)``: each block's amax is shrunk to an FP8-rounded block scale, the global
    scale fixed by the running abs-max of everything collected so far (this batch included;
    ``compute_global_amax`` returns it, so the export gives the block scales that were scored).

    ``state_dict`` keeps each running value times the batch count (``weighted_min``,
    ``weighted_max``) and the count (``batches``), all merged by sum: a merge gives the
    batch-count-weighted mean of the running values. The moving average is sequential, so no
    merge equals one process seeing every batch; this is the declared approximation.
    Shapes: running min/max ``[G]`` float64 in ``groups`` order; ranges in export shape.
    """

    merge_ops: ClassVar[dict[str, MergeOp]] = {
        **Calibrator.merge_ops,
        "batches": "sum",
        "weighted_min": "sum",
        "weighted_max": "sum",
        "absmax": "max",
    }

    def __init__(
        self,
        fmt: Format,
        granularity: Granularity,
        *,
        maxshrink: float = 0.2,
        grid: float = 100,
        norm: float = 2.4,
        patience: int = 5,
        averaging_constant: float = 0.01,
        nonfinite: NonFinite = NonFinite.SKIP,
    ):
        self.shrink = shrink_factors(maxshrink, grid)
        self.norm = float(_number("norm", norm, *_POSITIVE))
        self.patience = int(_number("patience", patience, *_COUNT))
        self.averaging_constant = float(
            _number("averaging_constant", averaging_constant, *_FRACTION)
        )
        self.scores_block_scales = _scores_block_scales(fmt, granularity)
        super().__init__(fmt, granularity, nonfinite=nonfinite)

    def _init_state(self, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        num, device = groups.shape[0], groups.device
        return {
            "min": torch.zeros(num, dtype=torch.float64, device=device),
            "max": torch.zeros(num, dtype=torch.float64, device=device),
            "batches": torch.zeros((), dtype=torch.float64, device=device),
            "absmax": torch.zeros((), dtype=torch.float32, device=device),
        }

    def _update(self, x: torch.Tensor, groups: torch.Tensor) -> None:
        lo, hi = torch.aminmax(groups, dim=1)
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        absmax = self._state["absmax"]
        torch.maximum(absmax, torch.maximum(-lo.min(), hi.max()), out=absmax)
        best = self._search(groups, lo, hi)
        p = self.shrink.to(groups.device)[best]
        batches = self._state["batches"]
        for key, bound in (("min", lo), ("max", hi)):
            winner = (p * bound.double()).float().double()
            running = self._state[key]
            if bool(batches == 0):
                running.copy_(winner)
            else:
                running.add_(winner.sub_(running).mul_(self.averaging_constant))
        batches += 1

    def _search(self, groups: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Index of each group's winning candidate, ``[G]``, exactly as the sequential search:
        on the CPU one candidate at a time (``shrink_cpu``), else in chunks."""
        if shrink_cpu.applies(self, groups, lo, hi):
            return shrink_cpu.search(self, groups, lo, hi)
        return self._search_chunks(groups, lo, hi)

    def _search_chunks(
        self, groups: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
    ) -> torch.Tensor:
        """``_search`` scoring a chunk of candidates per pass over ``groups``.

        The first chunk holds ``patience + 1`` candidates, each next one as many as the search
        needs at least before it can stop: no candidate past the sequential stop is scored. The
        early stop is resolved on the chunk's ``[K, G]`` errors.
        """
        num, device = groups.shape[0], groups.device
        shrink = self.shrink.to(device)
        best_error = torch.full((num,), math.inf, dtype=torch.float64, device=device)
        best = torch.zeros(num, dtype=torch.int64, device=device)
        most = min(len(shrink), self.patience + 1)
        per_tile = max(TILE_ELEMENTS // most, self.fmt.block_size)
        size = most * min(per_tile, max(groups.numel(), 1))
        scratch = (
            torch.empty(size, device=device),
            torch.empty(size, dtype=torch.float64, device=device),
        )
        begin, idle, previous = 0, 0, None
        while begin < len(shrink) and idle < self.patience:
            p = shrink[begin : begin + (most if begin == 0 else self.patience - idle)]
            errors, previous = self._errors(groups, lo, hi, p, scratch, previous)
            kept, idle = _early_stop(errors, best_error, idle, self.patience)
            errors = errors[:kept]
            index = errors.argmin(dim=0)
            error = errors.gather(0, index[None])[0]
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best = torch.where(better, index + begin, best)
            begin += len(p)
        return best

    def _errors(
        self,
        groups: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        p: torch.Tensor,
        scratch: tuple[torch.Tensor, torch.Tensor],
        previous: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``sum |xq - x| ** norm`` per candidate ``p`` and group, ``[K, G]`` float64, and the
        parameters ``[P, G]`` and errors ``[G]`` of the last candidate (the next ``previous``).

        Candidates with equal quantization parameters (FP8 block scales often are) score equal:
        a run of them is scored once, and a run that goes on from the previous chunk's last
        candidate takes its error, whatever the summation order of other tile shapes would
        give. ``scratch``: float32 and float64 buffers of ``len(p)`` times the tile size.
        """
        amin = (p[:, None] * lo.double()[None]).float()
        amax = (p[:, None] * hi.double()[None]).float()
        candidates = self._qparams(amin, amax)
        params, run = _distinct_runs(candidates)
        errors = torch.zeros(params.shape[1:], dtype=torch.float64, device=groups.device)
        per_tile = len(scratch[0]) // len(p)
        for rows, cols in tiles(*groups.shape, per_tile, self.fmt.block_size):
            x = groups[rows, cols]
            out, diff = (s[: len(errors) * x.numel()].view(len(errors), *x.shape) for s in scratch)
            diff.copy_(self._fake_quant(out, x, params[:, :, rows, None])).sub_(x)
            errors[:, rows] += diff.abs_().pow_(self.norm).sum(-1)
        if previous is not None:
            same = (params[:, 0] == previous[0]).all(dim=0)
            errors[0] = torch.where(same, previous[1], errors[0])
        errors = errors.gather(0, run)
        return errors, (candidates[:, -1], errors[-1])

    def _qparams(self, amin: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        """Quantization parameters of candidate ranges ``[K, G]``, stacked: ``[P, K, G]``.

        The format's scale and zero point; for block scales, each block's float32 effective
        scale (its FP8 scale times the global scale of the running abs-max).
        """
        if not self.scores_block_scales:
            return torch.stack(self.fmt.scale_zero_point(amin, amax))
        global_scale = self.fmt.global_scale(self._state["absmax"])
        bound = torch.maximum(amin.abs(), amax.abs())
        block_scales = self.fmt.block_scales(bound, global_scale)
        return self.fmt.effective_scales(block_scales, global_scale)[None]

    def _fake_quant(self, out: torch.Tensor, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Q -> DQ of a tile for K candidates, written into ``out`` where the format can.

        ``x`` ``[rows, cols]``; ``params`` ``[P, K, rows, 1]``; ``out``, result ``[K, rows, cols]``.
        """
        if not self.scores_block_scales:
            return self.fmt.fake_quant_into(out, x, *params)
        return self.fmt.fake_quant_blocks(x, params[0])

    def _decide(self) -> tuple[torch.Tensor, torch.Tensor]:
        amin, amax = self._state["min"].float(), self._state["max"].float()
        if self.fmt.symmetric:
            bound = torch.maximum(amin.abs(), amax.abs())
            return -bound, bound
        return amin, amax

    def compute_global_amax(self) -> torch.Tensor | None:
        """Block form: the running abs-max that fixed the global scale; else the amax's max."""
        if self.scores_block_scales and self._state:
            return self._state["absmax"].clone()
        return super().compute_global_amax()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Running min/max as ``weighted_min``/``weighted_max`` (times ``batches``): sums merge."""
        state = super().state_dict()
        if state:
            state["weighted_min"] = state.pop("min").mul_(state["batches"])
            state["weighted_max"] = state.pop("max").mul_(state["batches"])
        return state

    def merge_(self, state: dict[str, torch.Tensor]) -> None:
        """Running min/max become the batch-count-weighted mean of both (see the class doc)."""
        if not state:
            return
        running = self._state
        self._state = self.state_dict()
        try:
            super().merge_(state)
        except Exception:
            self._state = running
            raise
        if self._state:
            self._state["min"] = self._state.pop("weighted_min").div_(self._state["batches"])
            self._state["max"] = self._state.pop("weighted_max").div_(self._state["batches"])


def _early_stop(
    errors: torch.Tensor, best_error: torch.Tensor, idle: int, patience: int
) -> tuple[int, int]:
    """How many of the chunk's candidates the sequential search scores, and the count of
    consecutive candidates without improvement after them.

    ``errors`` ``[K, G]``; ``best_error`` ``[G]`` before the chunk; ``idle`` that count before it.
    """
    before = torch.cat([best_error[None], errors]).cummin(dim=0).values[:-1]
    improved = (errors < before).any(dim=1)
    step = torch.arange(len(errors), device=errors.device)
    last = torch.where(improved, step, -1).cummax(dim=0).values
    idle_after = torch.where(last >= 0, step - last, idle + step + 1)
    stops = torch.nonzero(idle_after >= patience)
    if len(stops):
        return int(stops[0, 0]) + 1, patience
    return len(errors), int(idle_after[-1])


def _distinct_runs(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of equal parameters along the candidates of ``params`` ``[P, K, G]``.

    Returns the runs' parameters ``[P, J, G]`` (J the most runs of any group; a group with fewer
    repeats its last) and each candidate's run ``[K, G]``.
    """
    change = torch.ones(params.shape[1:], dtype=torch.bool, device=params.device)
    change[1:] = (params[:, 1:] != params[:, :-1]).any(dim=0)
    run = change.cumsum(dim=0).sub_(1)
    count = int(run[-1].max()) + 1
    runs = params[:, -1:].repeat(1, count, 1)
    return runs.scatter_(1, run.expand_as(params), params), run


def _scores_block_scales(fmt: Format, granularity: Granularity) -> bool:
    """True when each group is one block of a two-level format (its amax becomes a block scale)."""
    if fmt.block_size == 1:
        return False
    if isinstance(granularity, PerBlock | PerTensorGroup) and granularity.size == fmt.block_size:
        return isinstance(granularity, PerBlock)
    raise CalibrationError(
        f"shrink-mse with {fmt.name} needs PerBlock(axis, {fmt.block_size}) (shrinks block "
        f"amaxes) or PerTensorGroup(axis, {fmt.block_size}) (shrinks the global amax), "
        f"not {granularity.describe()}"
    )


_POSITIVE = (lambda v: 0 < v < math.inf, "a positive number")
_FRACTION = (lambda v: 0 < v <= 1, "in (0, 1]")
_COUNT = (lambda v: 1 <= v < math.inf and v == int(v), "an integer >= 1")


def _number(name: str, value: object, ok: Callable[[float], bool], need: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
        raise CalibrationError(f"shrink-mse option {name} must be {need}, not {value!r}")
    return value
