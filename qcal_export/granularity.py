"""Granularities: how a tensor is grouped so one reduction gives one statistic per group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PerTensor:
    """One statistic for the whole tensor: ``[*] -> []``."""

    def groups(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[1, numel]``."""
        return x.reshape(1, -1)

    def stat_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return ()

    def broadcast_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape that the scalar statistic takes to broadcast against a tensor of ``shape``."""
        return ()

    def unflatten(self, stat: torch.Tensor, stat_shape: tuple[int, ...]) -> torch.Tensor:
        """One statistic per group (``[G]``, in ``groups`` order) in the export shape."""
        return stat.reshape(stat_shape)

    def flatten(self, stat: torch.Tensor) -> torch.Tensor:
        """The inverse of ``unflatten``: export shape -> ``[G]`` in ``groups`` order."""
        return stat.reshape(-1)

    def expand(self, stat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The statistic (export shape) made to broadcast against a tensor of ``shape``."""
        return stat.reshape(())

    def describe(self) -> str:
        return "per-tensor"

    def onnx_attributes(self) -> dict[str, int]:
        """QuantizeLinear/DequantizeLinear attributes for a scale of this granularity."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per-tensor"}


@dataclass(frozen=True)
class PerAxis:
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

    def unflatten(self, stat: torch.Tensor, stat_shape: tuple[int, ...]) -> torch.Tensor:
        return stat.reshape(stat_shape)

    def flatten(self, stat: torch.Tensor) -> torch.Tensor:
        return stat.reshape(-1)

    def expand(self, stat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return stat.reshape(self.broadcast_shape(shape))

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
class PerTensorGroup:
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

    def unflatten(self, stat: torch.Tensor, stat_shape: tuple[int, ...]) -> torch.Tensor:
        return stat.reshape(stat_shape)

    def flatten(self, stat: torch.Tensor) -> torch.Tensor:
        return stat.reshape(-1)

    def expand(self, stat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return stat.reshape(())

    def describe(self) -> str:
        return f"per-tensor-group({self.axis}, {self.size})"

    def onnx_attributes(self) -> dict[str, int]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per-tensor-group", "axis": self.axis, "size": self.size}


Granularity = PerTensor | PerAxis | PerBlock | PerTensorGroup

_BY_TYPE: dict[str, type] = {
    "per-tensor": PerTensor,
    "per-axis": PerAxis,
    "per-block": PerBlock,
    "per-tensor-group": PerTensorGroup,
}


def granularity_from_dict(data: dict[str, Any]) -> Granularity:
    """The inverse of ``to_dict``; ValueError for an unknown type or fields."""
    fields = dict(data)
    kind = _BY_TYPE.get(fields.pop("type", None))
    if kind is None:
        raise ValueError(f"unknown granularity {data!r}: choose one of {sorted(_BY_TYPE)}")
    return kind(**fields)
