"""The host's share of cores, and torch's intra-op threads set for a stretch of work.

Work spread over several Python threads (collects of different tensors, decisions of different
calibrators) runs each piece with one torch thread: one piece per core, none waiting on
another's thread team.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
