"""GPTQ's column-by-column rounding with error compensation, on a weight ``[N, K]`` (rows: output
channels, columns: the reduction axis) and its layer input's Hessian ``H = Xᵀ X`` ``[K, K]``.

Each column is rounded in turn; its rounding error, scaled by the inverse Hessian's upper
Cholesky factor ``U``, is taken off the columns not yet rounded, so that ``X W`` changes least.
Columns go in blocks of ``lazy_block``: inside a block every update is applied at once, the
columns after it get the block's updates in one matrix product at its end (the same arithmetic
as one column at a time, batched). A group's scale (a block of ``size`` columns along K, or all
K columns for per-channel and per-tensor scales) is computed from the group's current values
when its first column is reached, so later groups see the compensated values.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from qcal_export.calibrators.threads import torch_threads
from qcal_export.errors import CalibrationError
from qcal_export.spec.formats import SCALE_FLOOR, IntFormat

LAZY_BLOCK = 128
"""Columns whose updates are applied inside the block; the rest get them in one product."""
PERCDAMP = 0.01
"""Dampening added to H's diagonal, as a fraction of its mean diagonal."""


@dataclass
class ColumnGroups:
    """Scales of the groups of columns: column ``j`` (original order) is in group ``j // size``;
    one range per row (``per_row``: per-channel and block scales) or one for all rows.

    ``amin``/``amax`` ``[R, G]`` (float32, R = N or 1) are each group's range when reached;
    ``scale``/``zero_point`` come from them through the format's own ``scale_zero_point``, the
    arithmetic the export uses, so the exported scales are the ones the columns were rounded with.
    """

    fmt: IntFormat
    size: int
    per_row: bool
    rows: int
    columns: int
    scale_floor: float = SCALE_FLOOR
    dtype: torch.dtype = torch.float32
    device: torch.device | str | None = None
    amin: torch.Tensor = field(init=False)
    amax: torch.Tensor = field(init=False)
    scale: torch.Tensor = field(init=False)
    zero_point: torch.Tensor = field(init=False)
    reached: list[bool] = field(init=False)

    def __post_init__(self) -> None:
        shape = (self.rows if self.per_row else 1, -(-self.columns // self.size))
        self.amin = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.amax = torch.zeros_like(self.amin)
        self.scale = torch.ones(shape, dtype=self.dtype, device=self.device)
        self.zero_point = torch.zeros_like(self.scale)
        self.reached = [False] * shape[1]

    def reach(self, group: int, values: torch.Tensor) -> None:
        """Set ``group``'s range and scale from its columns' current ``values`` ``[N, c]``."""
        lo = values.amin(dim=1) if self.per_row else values.amin().reshape(1)
        hi = values.amax(dim=1) if self.per_row else values.amax().reshape(1)
        lo, hi = lo.to(torch.float32), hi.to(torch.float32)
        scale, zero_point = self.fmt.scale_zero_point(lo, hi, self.scale_floor)
        self.amin[:, group], self.amax[:, group] = lo, hi
        self.scale[:, group], self.zero_point[:, group] = scale, zero_point
        self.reached[group] = True

    def quantize(
        self,
        column: torch.Tensor,
        group: int,
        codes: torch.Tensor | None = None,
        rounded: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``column`` ``[N]`` rounded as QuantizeLinear does: (codes, dequantized values),
        written into ``codes`` and ``rounded`` where given."""
        scale, zero_point = self.scale[:, group], self.zero_point[:, group]
        codes = torch.div(column, scale, out=codes) if codes is not None else column / scale
        codes.round_().add_(zero_point).clamp_(self.fmt.qmin, self.fmt.qmax)
        rounded = (
            torch.sub(codes, zero_point, out=rounded) if rounded is not None else codes - zero_point
        )
        return codes, rounded.mul_(scale)


@dataclass
class GptqResult:
    """The rounded weight ``[N, K]`` (dequantized, in the compute dtype), its integer codes (the
    format's storage dtype) and the groups whose scales it was rounded with."""

    weight: torch.Tensor
    codes: torch.Tensor
    groups: ColumnGroups


def gptq_columns(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    groups: ColumnGroups,
    percdamp: float = PERCDAMP,
    act_order: bool = False,
    lazy_block: int = LAZY_BLOCK,
) -> GptqResult:
    """Round ``weight`` ``[N, K]`` column by column in ``groups``' format, compensating each
    column's error on the columns after it by ``hessian`` ``[K, K]``.

    Dead columns (zero diagonal: an input always 0 on the data) get ``H_jj = 1``: rounded to
    nearest, they pass no error on, and keep their weight for inputs the data never showed. A
    value whose dequantization overflows float32 (as QuantizeLinear's would) passes none on;
    a compensation that overflows is a CalibrationError.
    ``act_order`` rounds the columns in order of decreasing ``H_jj``; groups stay blocks of
    consecutive columns, each scaled when the first of its columns is reached.
    """
    rows, columns = weight.shape
    h = hessian.to(weight.device)
    order, upper = _ordered_inverse(h, columns, percdamp, act_order, groups.dtype)
    # Columns as rows ([K, N]): each column and each block's rank-1 updates are contiguous.
    w = weight.T.to(groups.dtype)[order].contiguous()
    rounded, codes = torch.empty_like(w), torch.empty_like(w)
    group_of = [g // groups.size for g in order.tolist()]
    positions = _group_positions(group_of)
    for start in range(0, columns, lazy_block):
        end = min(start + lazy_block, columns)
        errors = torch.empty(end - start, rows, dtype=groups.dtype, device=w.device)
        # The column loop's ops are small: on the CPU, threads for each cost more than they save.
        with torch_threads(1) if w.device.type == "cpu" else nullcontext():
            for p in range(start, end):
                group = group_of[p]
                if not groups.reached[group]:
                    current = _current_values(w, errors, upper, start, p, end, positions[group])
                    groups.reach(group, current.T)
                groups.quantize(w[p], group, codes[p], rounded[p])
                error = torch.sub(w[p], rounded[p], out=errors[p - start]).div_(upper[p, p])
                error.nan_to_num_(posinf=0.0, neginf=0.0)
                w[p + 1 : end].addr_(upper[p, p + 1 : end], error, alpha=-1)
        if end < columns:
            w[end:].addmm_(upper[start:end, end:].T, errors, alpha=-1)
    if not bool(torch.isfinite(w).all()):
        raise CalibrationError(
            "the compensated weight overflowed float32 (weights near its limit, 3.4e38): give "
            "this weight another method"
        )
    inverse = torch.argsort(order)
    return GptqResult(rounded[inverse].T, codes[inverse].T.to(groups.fmt.storage_dtype), groups)


def _ordered_inverse(
    hessian: torch.Tensor, columns: int, percdamp: float, act_order: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the columns' rounding order, the upper Cholesky factor of the dampened ``H⁻¹`` in that
    order, as ``dtype``), both on ``hessian``'s device, for a weight of ``columns`` columns;
    dead columns' zero diagonal becomes 1."""
    if tuple(hessian.shape) != (columns, columns):
        raise CalibrationError(
            f"the Hessian is {tuple(hessian.shape)}, the weight has {columns} columns"
        )
    h = hessian.to(dtype=torch.float64, copy=True)
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0
    if act_order:
        order = torch.argsort(diagonal, descending=True, stable=True)
    else:
        order = torch.arange(columns, device=h.device)
    h = h[order][:, order]
    h.diagonal().add_(percdamp * float(h.diagonal().mean()))
    return order, _inverse_upper_cholesky(h, percdamp).to(dtype)


def _inverse_upper_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``U`` with ``Uᵀ U = H⁻¹`` (float64); CalibrationError when the damped H is not positive
    definite."""
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        lower_inverse = torch.linalg.solve_triangular(lower, eye, upper=False)
        upper, info = torch.linalg.cholesky_ex(lower_inverse.T @ lower_inverse, upper=True)
        if int(info) == 0:
            return upper
    raise CalibrationError(
        f"the layer input's Hessian is not positive definite with percdamp={percdamp:g}: "
        "raise percdamp (method option, e.g. 0.1) or calibrate on more data"
    )


def _group_positions(group_of: list[int]) -> list[tuple[int, ...]]:
    """Per group, the positions (in rounding order) of its columns, ascending."""
    found: dict[int, list[int]] = {}
    for position, group in enumerate(group_of):
        found.setdefault(group, []).append(position)
    return [tuple(found[g]) for g in range(max(group_of) + 1)]


def _current_values(
    w: torch.Tensor,
    errors: torch.Tensor,
    upper: torch.Tensor,
    start: int,
    position: int,
    end: int,
    group: tuple[int, ...],
) -> torch.Tensor:
    """The current values ``[c, N]`` of a group's columns (none rounded yet): those past this
    lazy block (``end``) still owe it the updates of its columns rounded so far."""
    inside = [p for p in group if p < end]
    outside = [p for p in group if p >= end]
    values = w[inside + outside]
    if outside and position > start:
        owed = upper[start:position, outside].T @ errors[: position - start]
        values[len(inside) :] -= owed
    return values
