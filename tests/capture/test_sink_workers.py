"""OrtCapture feeding its sink from several threads (``sink_workers``) on a real CPU session.

Each batch's tensors reach the sink once each, all of them before the next batch runs, with the
values the float32 forward pass gives; calibrators fed this way hold exactly the state they hold
fed one tensor at a time; the workers share the cores meanwhile and torch's thread count comes
back; a
sink that fails for one tensor fails the pass after the others are done with theirs.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from ort_mlp import FLOAT, data, mlp, reference

from qcal_export.calibrators import MaxCalibrator, PercentileCalibrator
from qcal_export.calibrators.threads import usable_cores
from qcal_export.capture.data import open_data
from qcal_export.capture.onnxruntime import OrtCapture
from qcal_export.spec.formats import INT8
from qcal_export.spec.granularity import PerTensor

CPU = ["CPUExecutionProvider"]
NAMES = ("h", "r", "x", "y")


class ThreadedRecorder:
    """A sink that keeps (name, value, torch threads, thread) of every call, under a lock."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[str, np.ndarray, int, int]] = []
        self._lock = threading.Lock()
        self._fail_on = fail_on

    def __call__(self, name: str, value: torch.Tensor) -> None:
        entry = (name, value.numpy().copy(), torch.get_num_threads(), threading.get_ident())
        with self._lock:
            self.calls.append(entry)
        if name == self._fail_on:
            raise ValueError(f"cannot take {name}")


@pytest.mark.parametrize("iobinding", [False, True])
def test_every_tensor_once_per_batch_with_its_forward_value(iobinding):
    batches = data(sizes=(3, 1, 7, 2, 5, 4))
    capture = OrtCapture(
        mlp(), dict.fromkeys(NAMES, FLOAT), providers=CPU, iobinding=iobinding, sink_workers=3
    )
    sink = ThreadedRecorder()
    threads = torch.get_num_threads()
    assert capture.run(open_data(batches), sink) == len(batches)
    assert torch.get_num_threads() == threads
    assert {call[2] for call in sink.calls} == {max(1, usable_cores() // 3)}
    for index, b in enumerate(batches):  # batch i's calls all come before batch i + 1's
        calls = sink.calls[index * len(NAMES) : (index + 1) * len(NAMES)]
        assert sorted(name for name, *_ in calls) == sorted(NAMES)
        want = reference(b["x"])
        for name, value, *_ in calls:
            assert np.allclose(value, want[name], rtol=1e-5, atol=1e-6), (index, name)


def test_calibrators_fed_from_threads_equal_those_fed_in_order():
    batches = data(sizes=(64, 33, 128, 7), seed=11)
    states = []
    for workers in (1, 4):
        cals = {
            name: (
                PercentileCalibrator(INT8, PerTensor(), bins=256),
                MaxCalibrator(INT8, PerTensor()),
            )
            for name in NAMES
        }

        def sink(name: str, value: torch.Tensor, cals=cals) -> None:
            for cal in cals[name]:
                cal.collect(value)

        capture = OrtCapture(
            mlp(), dict.fromkeys(NAMES, FLOAT), providers=CPU, sink_workers=workers
        )
        capture.run(open_data(batches), sink)
        states.append(
            {(n, k): c.state_dict() for n, pair in cals.items() for k, c in enumerate(pair)}
        )
    ordered, threaded = states
    assert ordered.keys() == threaded.keys()
    for key, state in ordered.items():
        assert state.keys() == threaded[key].keys()
        for entry, value in state.items():
            assert torch.equal(value, threaded[key][entry]), (key, entry)
    assert int(ordered[("x", 0)]["hist"].sum()) == sum(b["x"].size for b in batches)


def test_a_failing_tensor_fails_the_pass_after_the_others_are_fed():
    capture = OrtCapture(mlp(), dict.fromkeys(NAMES, FLOAT), providers=CPU, sink_workers=4)
    sink = ThreadedRecorder(fail_on="r")
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="cannot take r"):
        capture.run(open_data(data()), sink)
    assert sorted(name for name, *_ in sink.calls) == sorted(NAMES)  # the first batch only
    assert torch.get_num_threads() == threads


def test_one_worker_feeds_in_order_from_the_calling_thread():
    """The plain loop: outputs in the order asked, then the inputs, all from the caller."""
    capture = OrtCapture(mlp(), dict.fromkeys(NAMES, FLOAT), providers=CPU, sink_workers=1)
    sink = ThreadedRecorder()
    capture.run(open_data(data()), sink)
    assert {call[3] for call in sink.calls} == {threading.get_ident()}
    assert [name for name, *_ in sink.calls] == ["h", "r", "y", "x"] * len(data())
