"""The host's usable cores follow the process's affinity; torch's thread count is set inside
``torch_threads`` (for threads started there too) and restored after, even on an error."""

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
