"""The host's usable cores follow the process's affinity, its workers are one per core of a
process's share up to ``HOST_WORKERS``; torch's thread count is set inside ``torch_threads``
(for threads started there too) and restored after, even on an error."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from qcal_export.calibrators import threads


@pytest.mark.parametrize("affinity", [set(), {0}, {0, 3, 5}])
def test_usable_cores_are_the_affinity_and_at_least_one(monkeypatch, affinity):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert threads.usable_cores() == (len(affinity) or 7)


@pytest.mark.parametrize(
    ("cores", "processes", "want"), [(1, 1, 1), (2, 1, 2), (16, 1, 4), (16, 8, 2), (3, 4, 1)]
)
def test_host_workers_share_the_cores_up_to_the_limit(monkeypatch, cores, processes, want):
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads, "HOST_WORKERS", 4)
    assert threads.host_workers(processes) == want


def test_torch_threads_inside_and_in_threads_started_there_then_restored():
    before = torch.get_num_threads()
    seen = []
    with pytest.raises(RuntimeError), threads.torch_threads(1):
        worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        worker.start()
        worker.join()
        seen.append(torch.get_num_threads())
        raise RuntimeError("inside")
    assert seen == [1, 1]
    assert torch.get_num_threads() == before
