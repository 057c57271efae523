"""The calibrator contract: collect / compute_amax / reset / state_dict / merge_.

A calibrator composes a format and a granularity. ``collect`` only accumulates statistics,
``compute_amax`` only decides. ``state_dict`` holds tensors whose merge across processes is
elementwise; ``merge_ops`` says which reduction merges each entry.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch

from qcal_export.calibrators import kernels
from qcal_export.errors import CalibrationError
from qcal_export.spec.choices import NonFinite
from qcal_export.spec.formats import Format, floor_zero
from qcal_export.spec.granularity import Granularity

_VERSIONS = itertools.count()
"""Every calibrator's state versions: each change takes the next, so none repeats."""

MergeOp = Literal["sum", "max", "min", "same"]


class Calibrator(ABC):
    """Accumulates statistics of one tensor and turns them into an amax of export shape."""

    merge_ops: ClassVar[dict[str, MergeOp]] = {
        "stat_shape": "same",
        "numel": "sum",
        "nonfinite": "sum",
    }
    nonfinite_fill: ClassVar[float] = 0.0
    """What a skipped non-finite value becomes before ``_update``: 0 adds no error and lies
    inside every range."""
    host_nonfinite_check: ClassVar[bool] = False
    """Check for non-finite values on the host even on CUDA: for a calibrator whose collect
    waits for the device anyway, one early sync is cheaper than the device-side pass."""

    def __init__(
        self, fmt: Format, granularity: Granularity, *, nonfinite: NonFinite = NonFinite.SKIP
    ):
        if nonfinite not in NonFinite.values():
            raise CalibrationError(f"nonfinite must be {NonFinite.described()}, not {nonfinite!r}")
        self.fmt = fmt
        self.granularity = granularity
        self.nonfinite = NonFinite(nonfinite)
        self.reset()

    def reset(self) -> None:
        """Forget everything collected."""
        self._state: dict[str, torch.Tensor] = {}
        self._shape: tuple[int, ...] | None = None
        self._decided: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._changed()

    @property
    def state_version(self) -> int:
        """A number that changes whenever the state does (collect, merge, restore, reset) and
        never comes back: what is computed from the state stays current while it holds."""
        return self._version

    def _changed(self) -> None:
        self._version = next(_VERSIONS)

    def keep_decision(self, amin: torch.Tensor, amax: torch.Tensor) -> None:
        """Hold ``(amin, amax)`` (per group, as ``_decide`` gives them), decided elsewhere on
        this state (``histogram.decide_together``), as the decision until the state changes."""
        self._decided = (self.state_version, (amin, amax))

    @classmethod
    def granularity_for(cls, fmt: Format, granularity: Granularity) -> Granularity:
        """The granularity this calibrator collects with, for a tensor exported with
        ``granularity`` in ``fmt`` (the same, unless the method decides something coarser)."""
        return granularity

    @property
    def needs_initial_range(self) -> bool:
        """True when ``collect`` needs a range from an earlier pass (see MseCalibrator)."""
        return False

    @property
    def collected(self) -> bool:
        return bool(self._state)

    @property
    def stat_shape(self) -> tuple[int, ...] | None:
        """Export shape of the statistics; None before the first collect. Read from the state
        once (it may live on a GPU: each read would wait for the device)."""
        if not self._state:
            return None
        if self._shape is None:
            self._shape = tuple(self._state["stat_shape"].tolist())
        return self._shape

    @property
    def nonfinite_count(self) -> int:
        return int(self._state["nonfinite"]) if self._state else 0

    def collect(self, x: torch.Tensor) -> None:
        """Fold one tensor (any device, any float dtype) into the statistics; empty is a no-op."""
        if x.numel() == 0:
            return
        shape = self.granularity.stat_shape(tuple(x.shape))
        x, nonfinite = self._drop_nonfinite(x.detach().to(self._input_dtype(x)))
        if not self._state:
            self._state = self._init_state(self.granularity.groups(x))
            device = x.device
            stat_shape = torch.tensor(shape, dtype=torch.int64)
            self._state["stat_shape"] = stat_shape.to(device, non_blocking=True)  # no host sync
            self._shape = shape
            self._state["numel"] = torch.zeros((), dtype=torch.float64, device=device)
            self._state["nonfinite"] = torch.zeros((), dtype=torch.float64, device=device)
        elif shape != self.stat_shape:
            raise CalibrationError(
                f"{self.granularity.describe()} statistics of shape {shape} do not match "
                f"{self.stat_shape} from earlier batches (tensor shape {tuple(x.shape)})"
            )
        self._state["nonfinite"] += nonfinite
        self._state["numel"] += x.numel()
        self._update(x, self.granularity.groups(x))
        self._changed()

    def compute_amax(self) -> torch.Tensor | None:
        """Amax of export shape (AMAX_FLOOR where the range is zero); None if nothing was
        collected."""
        amin, amax = self.compute_range() or (None, None)
        if amax is None:
            return None
        return floor_zero(torch.maximum(amin.abs(), amax.abs()))

    def compute_global_amax(self) -> torch.Tensor | None:
        """The tensor-wide amax a two-level format (nvfp4) scales by; None before collect."""
        amax = self.compute_amax()
        return None if amax is None else amax.max()

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(min, max) of export shape; for symmetric formats ``(-amax, amax)``."""
        if not self._state:
            return None
        version, decided = self._decided or (None, None)
        amin, amax = decided if version == self.state_version else self._decide()
        unflatten = self.granularity.unflatten
        return unflatten(amin, self.stat_shape), unflatten(amax, self.stat_shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that merge elementwise by ``merge_ops``; empty when nothing was collected."""
        return {k: v.clone() for k, v in self._state.items()}

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The raw state on the CPU, for resumable runs: ``restore`` gives this calibrator back
        exactly (``state_dict`` is for merging, which may transform it)."""
        return {k: v.detach().cpu().clone() for k, v in self._state.items()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Replace the state with a ``snapshot`` of a calibrator built the same way."""
        self._state = {k: v.clone() for k, v in snapshot.items()}
        self._shape = None
        self._changed()

    def merge_(self, state: dict[str, torch.Tensor]) -> None:
        """Fold another calibrator's ``state_dict`` into this one (same format and shapes)."""
        if not state:
            return
        self._changed()
        if not self._state:
            self._state = {k: v.clone() for k, v in state.items()}
            self._shape = None
            return
        if state.keys() != self._state.keys():
            raise CalibrationError(
                f"cannot merge state with keys {sorted(state)} into {sorted(self._state)}"
            )
        for key, mine in self._state.items():
            theirs = state[key].to(mine.device)
            if theirs.shape != mine.shape:
                raise CalibrationError(
                    f"cannot merge {key!r} of shape {tuple(theirs.shape)} into {tuple(mine.shape)}"
                )
            _merge_entry(key, self.merge_ops[key], mine, theirs)

    def _input_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype ``_update`` gets ``x`` in: float32, but bf16 and fp16 stay as they are
        where a fused kernel reads them (it upcasts in registers): no float32 copy."""
        if x.dtype in (torch.bfloat16, torch.float16) and self._fused(x):
            return x.dtype
        return torch.float32

    def _fused(self, groups: torch.Tensor) -> bool:
        """Whether a Triton kernel collects ``groups`` (calibrators that have one say when)."""
        return False

    def _drop_nonfinite(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | int]:
        """``x`` with ``nonfinite_fill`` in place of each non-finite value, and their count.

        Raises before any state changes when ``nonfinite="error"``, which waits for the device.
        On CUDA, "skip" never waits (unless ``host_nonfinite_check``): a Triton pass counts
        them into a device tensor and replaces them, or only counts them where ``_update``'s
        kernel reads them as no data.
        """
        if (
            x.is_cuda
            and self.nonfinite == NonFinite.SKIP
            and kernels.HAS_TRITON
            and not self.host_nonfinite_check
        ):
            from qcal_export.calibrators.kernels.nonfinite import nonfinite

            return nonfinite(x, None if self._skips_nonfinite(x) else self.nonfinite_fill)
        if bool(torch.isfinite(x.sum())):  # one reduction; NaN/Inf (or overflow) look closer
            return x, 0
        finite = torch.isfinite(x)
        count = finite.numel() - int(finite.sum())
        if count == 0:
            return x, 0
        if self.nonfinite == NonFinite.ERROR:
            raise CalibrationError(f"{count} non-finite values (NaN/Inf) in a collected tensor")
        return torch.where(finite, x, self.nonfinite_fill), count

    def _skips_nonfinite(self, x: torch.Tensor) -> bool:
        """Whether ``_update`` reads the non-finite values of ``x`` as no data itself (a fused
        kernel that adds no error for them, or leaves them out of its counts)."""
        return False

    @abstractmethod
    def _init_state(self, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        """Empty statistics for ``groups`` of shape ``[G, n]``."""

    @abstractmethod
    def _update(self, x: torch.Tensor, groups: torch.Tensor) -> None:
        """Fold finite ``x`` (also given as ``groups``, ``[G, n]``) into the state; ``x`` is
        float32, or of the dtype ``_input_dtype`` chose."""

    @abstractmethod
    def _decide(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (min, max), each ``[G]``."""


def _merge_entry(key: str, op: MergeOp, mine: torch.Tensor, theirs: torch.Tensor) -> None:
    if op == "sum":
        mine += theirs
    elif op == "max":
        torch.maximum(mine, theirs, out=mine)
    elif op == "min":
        torch.minimum(mine, theirs, out=mine)
    elif not torch.equal(mine, theirs):
        raise CalibrationError(f"cannot merge {key!r}: it must be equal in both states")
