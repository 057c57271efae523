"""Granularities: how a tensor is grouped so one reduction gives one statistic per group."""

from __future__ import annotations

from dataclasses import dataclass

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

    def describe(self) -> str:
        return "per-tensor"


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

    def describe(self) -> str:
        return f"per-axis({self.axis})"


Granularity = PerTensor | PerAxis
