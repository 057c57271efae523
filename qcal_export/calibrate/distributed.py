"""Calibration split across processes with ``torch.distributed``: sharded batches, merged states.

Launched by ``torchrun`` (or ``qcal calibrate --nproc N``, which runs torch's launcher), every
rank reads the same data source and keeps batch ``i`` when ``i % world == rank``: each batch is
used exactly once, splits may be uneven and a rank may get none. After each capture pass every
rank sends its calibrators' ``state_dict``s to all (``all_gather_object``, on the CPU) and merges
them in rank order, so every rank holds the same merged state, exactly the merge of the shards:
bit-identical to one process for max (and any order-free statistic), the same sums in another
order for the sweep methods. The gather also carries each rank's failure, if it had one: then
every rank raises the first failing rank's error instead of waiting for it; collectives time
out (``QCAL_DIST_TIMEOUT`` seconds, default 600) if a rank dies outright.
"""

from __future__ import annotations

import datetime
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from qcal_export.capture.data import DataSource, select_batches
from qcal_export.errors import DataError, QcalError

DEFAULT_TIMEOUT_S = 600


class DistributedError(QcalError):
    """Another rank failed (its error is in the message), or the ranks disagree."""


class Mergeable(Protocol):
    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def merge_(self, state: dict[str, torch.Tensor]) -> None: ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class Ranks:
    """This process's place: ``rank`` of ``world``; rank 0 writes the outputs."""

    rank: int = 0
    world: int = 1

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def shard(self, source: DataSource) -> DataSource:
        """The batches of ``source`` this rank calibrates on: ``i % world == rank``."""
        if self.world == 1:
            return source
        return select_batches(
            source, lambda i: i % self.world == self.rank, f"rank {self.rank} of {self.world}"
        )

    def merge(
        self, objects: dict[str, Mergeable], count: int, failure: BaseException | None = None
    ) -> int:
        """Give every rank the merge of all ranks' states of ``objects`` (same keys on every
        rank) and return the batches all ranks saw (``count`` is this rank's); or raise the
        failure of the first rank that had one (this one's included)."""
        if self.world == 1:
            if failure is not None:
                raise failure
            return count
        mine = {
            "failure": None if failure is None else _describe(failure),
            "count": count,
            "states": {} if failure else {k: _cpu(o.state_dict()) for k, o in objects.items()},
        }
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, mine)
        failed = [(r, g["failure"]) for r, g in enumerate(gathered) if g["failure"]]
        if failed:
            rank, message = failed[0]
            if failure is not None and rank == self.rank:
                raise failure
            raise DistributedError(f"rank {rank} of {self.world} failed: {message}")
        total = sum(g["count"] for g in gathered)
        if total == 0:
            raise DataError(f"no rank of {self.world} got a calibration batch")
        for key, obj in objects.items():
            obj.reset()
            for state in gathered:
                obj.merge_(state["states"][key])
        return total

    def run_pass(self, capture: Callable[[], int], objects: dict[str, Mergeable]) -> int:
        """One capture pass on this rank's batches, then the merge (or every rank's stop with
        the first failure: a rank that fails still joins the gather, to say so)."""
        try:
            count = capture()
        except Exception as error:  # any failure must reach the other ranks
            return self.merge(objects, 0, error)
        return self.merge(objects, count)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def _describe(error: BaseException) -> str:
    if isinstance(error, QcalError):
        return str(error)
    return "".join(traceback.format_exception_only(type(error), error)).strip()


def ranks_from_env(cuda: bool) -> Ranks:
    """The process group torchrun's environment describes (``WORLD_SIZE``, ``RANK`` and the
    rendezvous variables), initialised once: gloo, or NCCL when ``cuda``. One process alone
    needs none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    if not dist.is_initialized():
        if cuda:  # NCCL's object collectives run on the current device: this rank's GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = float(os.environ.get("QCAL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        dist.init_process_group(
            "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout)
        )
    return Ranks(dist.get_rank(), dist.get_world_size())
