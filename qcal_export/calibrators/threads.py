"""The host's share of cores, and torch's intra-op threads set for a stretch of work.

Work spread over several Python threads (collects of different tensors, decisions of different
calibrators) shares the cores: each thread's torch operations get ``cores // workers`` threads.
The workers are few (``HOST_WORKERS``): between its operations each holds the GIL, and past a
few threads they wait on it more than they gain.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

HOST_WORKERS = 4
"""The most host threads that collect or decide side by side."""


def host_workers(processes: int = 1) -> int:
    """Threads to collect or decide with: one per core of this process's share (the cores over
    ``processes`` on one host), at most ``HOST_WORKERS``."""
    return max(1, min(HOST_WORKERS, usable_cores() // processes))


def usable_cores() -> int:
    """Cores this process may run on (its affinity where the OS tells it), at least 1."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return max(1, len(usable) if usable else os.cpu_count() or 1)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside, restored after (process-wide: threads
    started inside take it too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def sharing_pool(workers: int, name: str) -> Iterator[ThreadPoolExecutor]:
    """``workers`` threads (named ``name``) whose torch operations share the usable cores
    (``torch_threads``) while the pool is open."""
    with (
        torch_threads(max(1, usable_cores() // workers)),
        ThreadPoolExecutor(workers, thread_name_prefix=name) as pool,
    ):
        yield pool
