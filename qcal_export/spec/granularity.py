"""Granularities: how a tensor is grouped so one reduction gives one statistic per group."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from qcal_export.errors import RecipeError


class _RowMajorStats:
    """Statistics whose ``groups`` order is the export shape's row-major order."""

    def unflatten(self, stat: torch.Tensor, stat_shape: tuple[int, ...]) -> torch.Tensor:
        """One statistic per group (``[G]``, in ``groups`` order) in the export shape."""
        return stat.reshape(stat_shape)

    def flatten(self, stat: torch.Tensor) -> torch.Tensor:
        """The inverse of ``unflatten``: export shape -> ``[G]`` in ``groups`` order."""
        return stat.reshape(-1)


class _BroadcastStats(_RowMajorStats):
    """Statistics that broadcast against the tensor as they are (one per tensor, axis or row)."""

    def expand(self, stat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The statistic (export shape) made to broadcast against a tensor of ``shape``."""
        return stat.reshape(self.broadcast_shape(shape))


@dataclass(frozen=True)
class PerTensor(_BroadcastStats):
    """One statistic for the whole tensor: ``[*] -> []``."""

    def groups(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[1, numel]``."""
        return x.reshape(1, -1)

    def stat_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return ()

    def broadcast_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape that the scalar statistic takes to broadcast against a tensor of ``shape``."""
        return ()

    def describe(self) -> str:
        return "per-tensor"

    def onnx_attributes(self) -> dict[str, int]:
        """QuantizeLinear/DequantizeLinear attributes for a scale of this granularity."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per-tensor"}


@dataclass(frozen=True)
class PerAxis(_BroadcastStats):
    """One statistic per index of ``axis``: ``[..., C (at axis), ...] -> [C]``."""

    axis: int

    def groups(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[C, numel / C]`` with the channels of ``axis`` as rows."""
        return x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)

    def stat_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[self.axis],)

    def broadcast_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape that a ``[C]`` statistic takes to broadcast against a tensor of ``shape``."""
        axis = self.axis % len(shape)
        return tuple(n if i == axis else 1 for i, n in enumerate(shape))

    def describe(self) -> str:
        return f"per-axis({self.axis})"

    def onnx_attributes(self) -> dict[str, int]:
        return {"axis": self.axis}

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per-axis", "axis": self.axis}


@dataclass(frozen=True)
class PerBlock:
    """One statistic per block of ``size`` along ``axis`` (the reduction axis).

    ``[..., n (at axis), ...] -> [..., ceil(n / size), ...]``; a last partial block is padded
    with zeros, which change neither an amax nor a squared error.
    """

    axis: int
    size: int

    def groups(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[num_blocks, size]``, blocks ordered as the moved stat shape (axis last)."""
        moved = x.movedim(self.axis, -1)
        pad = -moved.shape[-1] % self.size
        if pad:
            moved = torch.nn.functional.pad(moved, (0, pad))
        return moved.reshape(-1, self.size)

    def stat_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        axis = self.axis % len(shape)
        blocks = -(-shape[axis] // self.size)
        return tuple(blocks if i == axis else n for i, n in enumerate(shape))

    def unflatten(self, stat: torch.Tensor, stat_shape: tuple[int, ...]) -> torch.Tensor:
        axis = self.axis % len(stat_shape)
        moved = [n for i, n in enumerate(stat_shape) if i != axis] + [stat_shape[axis]]
        return stat.reshape(moved).movedim(-1, axis)

    def flatten(self, stat: torch.Tensor) -> torch.Tensor:
        if stat.dim() == 0:
            return stat.reshape(-1)
        return stat.movedim(self.axis, -1).reshape(-1)

    def expand(self, stat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Each block's statistic repeated over its elements: ``shape`` itself."""
        axis = self.axis % len(shape)
        return stat.repeat_interleave(self.size, dim=axis).narrow(axis, 0, shape[axis])

    def describe(self) -> str:
        return f"per-block({self.axis}, {self.size})"

    def onnx_attributes(self) -> dict[str, int]:
        return {"axis": self.axis, "block_size": self.size}

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per-block", "axis": self.axis, "size": self.size}


@dataclass(frozen=True)
class PerTensorGroup(_BroadcastStats):
    """One statistic for the whole tensor, seen as blocks of ``size`` along ``axis``: ``[*] -> []``.

    For formats with a global scale and dynamic block scales (NVFP4 activations): ``groups``
    gives ``[1, num_blocks * size]`` with each block contiguous (the axis moved last, a partial
    last block padded with zeros), so a fake-quantization can find every block's own amax.
    """

    axis: int
    size: int

    def groups(self, x: torch.Tensor) -> torch.Tensor:
        return PerBlock(self.axis, self.size).groups(x).reshape(1, -1)

    def stat_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return ()

    def broadcast_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return ()

    def describe(self) -> str:
        return f"per-tensor-group({self.axis}, {self.size})"

    def onnx_attributes(self) -> dict[str, int]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per-tensor-group", "axis": self.axis, "size": self.size}


def _no_onnx_form(granularity: Any) -> dict[str, int]:
    raise RecipeError(
        f"{granularity.describe()} granularity has no QuantizeLinear/DequantizeLinear form: it "
        "serves serving checkpoints and torch, not ONNX QDQ; export ONNX with per-tensor, "
        "per-axis or per-block"
    )


@dataclass(frozen=True)
class PerGroupIndex:
    """Groups of ``size`` columns along ``axis`` in any order: column j is in group ``g_idx[j]``.

    Activation ordering (GPTQ ``actorder``): every group has ``size`` columns except possibly the
    last one. ``[..., n (at axis), ...] -> [..., num_groups, ...]``, ``len(g_idx) == n``.
    """

    axis: int
    size: int
    g_idx: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "g_idx", tuple(int(g) for g in self.g_idx))
        if self.size < 1 or not self.g_idx or min(self.g_idx) < 0:
            raise ValueError(
                f"per-group-index needs size >= 1 and a non-empty g_idx of group numbers >= 0 "
                f"(size {self.size}, {len(self.g_idx)} columns)"
            )
        counts = torch.bincount(torch.tensor(self.g_idx)).tolist()
        for group, count in enumerate(counts):
            last = group == len(counts) - 1
            if count != self.size and not (last and 0 < count < self.size):
                raise ValueError(
                    f"g_idx puts {count} columns in group {group} of {len(counts)}: every group "
                    f"needs size={self.size} columns, the last one 1 to {self.size}"
                )

    @property
    def num_groups(self) -> int:
        return max(self.g_idx) + 1

    @functools.cached_property
    def _order(self) -> torch.Tensor:
        """Columns sorted by group (stable: ascending column within a group)."""
        return torch.argsort(torch.tensor(self.g_idx), stable=True)

    def _check(self, shape: tuple[int, ...]) -> int:
        axis = self.axis % len(shape)
        if shape[axis] != len(self.g_idx):
            raise ValueError(
                f"{self.describe()} has {len(self.g_idx)} columns in g_idx, the tensor "
                f"{shape[axis]} along axis {self.axis} (shape {shape})"
            )
        return axis

    def groups(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[num_blocks, size]``: columns gathered by group, axis last, as PerBlock."""
        self._check(tuple(x.shape))
        moved = x.movedim(self.axis, -1)
        ordered = moved.index_select(-1, self._order.to(x.device))
        return PerBlock(-1, self.size).groups(ordered)

    def stat_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        axis = self._check(shape)
        return tuple(self.num_groups if i == axis else n for i, n in enumerate(shape))

    def unflatten(self, stat: torch.Tensor, stat_shape: tuple[int, ...]) -> torch.Tensor:
        return PerBlock(self.axis, self.size).unflatten(stat, stat_shape)

    def flatten(self, stat: torch.Tensor) -> torch.Tensor:
        return PerBlock(self.axis, self.size).flatten(stat)

    def expand(self, stat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Each column gets its group's statistic: ``shape`` itself."""
        index = torch.tensor(self.g_idx, device=stat.device)
        return stat.index_select(self._check(shape), index)

    def describe(self) -> str:
        return f"per-group-index({self.axis}, {self.size}, {self.num_groups} groups)"

    def onnx_attributes(self) -> dict[str, int]:
        return _no_onnx_form(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "per-group-index",
            "axis": self.axis,
            "size": self.size,
            "g_idx": list(self.g_idx),
        }


@dataclass(frozen=True)
class PerBlock2D(_RowMajorStats):
    """One statistic per 2-D block ``[rows, cols]`` of the last two axes (FP8 128x128 weights).

    ``[..., R, C] -> [..., ceil(R / rows), ceil(C / cols)]``; partial blocks are padded with
    zeros, which change neither an amax nor an error sum.
    """

    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"per-block-2d needs rows, cols >= 1, not {self.rows}, {self.cols}")

    def groups(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[num_blocks, rows * cols]``, blocks in export-shape order."""
        stat = self.stat_shape(tuple(x.shape))
        pad = (0, -x.shape[-1] % self.cols, 0, -x.shape[-2] % self.rows)
        if any(pad):
            x = torch.nn.functional.pad(x, pad)
        tiles = x.reshape(*stat[:-1], self.rows, stat[-1], self.cols).transpose(-3, -2)
        return tiles.reshape(-1, self.rows * self.cols)

    def stat_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) < 2:
            raise ValueError(f"{self.describe()} needs a tensor of 2 or more axes, not {shape}")
        *lead, rows, cols = shape
        return (*lead, -(-rows // self.rows), -(-cols // self.cols))

    def expand(self, stat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Each block's statistic repeated over its elements: ``shape`` itself."""
        rows = stat.repeat_interleave(self.rows, dim=-2).narrow(-2, 0, shape[-2])
        return rows.repeat_interleave(self.cols, dim=-1).narrow(-1, 0, shape[-1])

    def describe(self) -> str:
        return f"per-block-2d({self.rows}, {self.cols})"

    def onnx_attributes(self) -> dict[str, int]:
        return _no_onnx_form(self)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per-block-2d", "rows": self.rows, "cols": self.cols}


@dataclass(frozen=True)
class PerToken(_BroadcastStats):
    """One statistic per row along the last axis (per token of an activation).

    ``[..., C] -> [...]``.
    """

    def groups(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[numel / C, C]``."""
        self.stat_shape(tuple(x.shape))
        return x.reshape(-1, x.shape[-1])

    def stat_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if not shape:
            raise ValueError("per-token needs a tensor of 1 or more axes, not a scalar")
        return shape[:-1]

    def broadcast_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-1], 1)

    def describe(self) -> str:
        return "per-token"

    def onnx_attributes(self) -> dict[str, int]:
        return _no_onnx_form(self)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per-token"}


Granularity = (
    PerTensor | PerAxis | PerBlock | PerTensorGroup | PerGroupIndex | PerBlock2D | PerToken
)

_BY_TYPE: dict[str, type] = {
    "per-tensor": PerTensor,
    "per-axis": PerAxis,
    "per-block": PerBlock,
    "per-tensor-group": PerTensorGroup,
    "per-group-index": PerGroupIndex,
    "per-block-2d": PerBlock2D,
    "per-token": PerToken,
}


def granularity_from_dict(data: dict[str, Any]) -> Granularity:
    """The inverse of ``to_dict``; ValueError for an unknown type or fields."""
    fields = dict(data)
    kind = _BY_TYPE.get(fields.pop("type", None))
    if kind is None:
        raise ValueError(f"unknown granularity {data!r}: choose one of {sorted(_BY_TYPE)}")
    return kind(**fields)
