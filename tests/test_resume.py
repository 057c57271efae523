"""Resumable calibration: a run killed mid-way (SIGKILL in a child process) and resumed from
its state file gives the scales of a run that was never interrupted, bit for bit.

The child calibrates the seq MLP of mlp.py on 12 deterministic batches and kills itself while
reading batch ``at`` of pass ``in_pass``; the parent resumes from the state it saved.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from mlp import make_mlp

from qcal_export import calibrate_onnx
from qcal_export.errors import DataError, RecipeError

NUM_BATCHES = 12


def batch(index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + index)
    return {"x": (rng.standard_t(4, (3, 5, 64)) * (1 + index / 4)).astype(np.float32)}


def data():
    return (batch(i) for i in range(NUM_BATCHES))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_mlp(tmp_path_factory.mktemp("resume"), seq=True) / "mlp.onnx"


def run_killed(model: Path, state: Path, options: dict, in_pass: int, at: int) -> None:
    """Calibrate in a child that SIGKILLs itself on reaching batch ``at`` of pass ``in_pass``."""
    code = f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_resume import batch
        from qcal_export import calibrate_onnx
        passes = []
        def data():
            passes.append(1)
            for i in range({NUM_BATCHES}):
                if len(passes) == {in_pass} and i == {at}:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield batch(i)
        calibrate_onnx({str(model)!r}, data, state={str(state)!r}, validate_batches=0,
                       **{options!r})
    """
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], timeout=300)
    assert child.returncode == -signal.SIGKILL


CASES = {
    "max-pass-1": ({"state_every": 3}, 1, 8),
    "mse-pass-2": ({"method": "mse", "weight_method": "mse", "state_every": 2}, 2, 5),
    "mse-between-passes": ({"method": "mse", "state_every": 5}, 2, 0),
    "percentile": ({"method": "percentile", "state_every": 4}, 1, 9),
    "entropy": ({"method": "entropy", "state_every": 1}, 1, 4),
    "shrink-mse": ({"method": "shrink-mse", "weight_method": "shrink-mse", "state_every": 3}, 1, 7),
    "nvfp4-hessian": (
        {
            "format": "nvfp4",
            "method": "mse",
            "weight_method": "nvfp4-mse",
            "hessian": True,
            "state_every": 2,
        },
        2,
        3,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_killed_run_resumes_to_the_uninterrupted_scales(model, tmp_path, case):
    options, in_pass, at = CASES[case]
    options = {k: v for k, v in options.items() if v is not None}
    state = tmp_path / "calib.state"
    run_killed(model, state, options, in_pass, at)
    assert state.is_file()
    resumed = calibrate_onnx(model, data, state=state, resume=True, validate_batches=0, **options)
    whole = calibrate_onnx(model, data, validate_batches=0, **options)
    assert resumed.report["batches_per_pass"] == whole.report["batches_per_pass"]
    assert set(resumed.scales) == set(whole.scales)
    for name, entry in whole.scales.items():
        for field in ("amax", "scale", "zero_point", "global_scale"):
            mine, reference = getattr(resumed.scales[name], field), getattr(entry, field)
            assert (mine is None) == (reference is None), (name, field)
            if mine is not None:
                assert torch.equal(mine, reference), (case, name, field)
    assert not state.exists()  # removed once calibration completed


def test_resume_refuses_a_state_saved_for_another_recipe(model, tmp_path):
    state = tmp_path / "calib.state"
    run_killed(model, state, {"state_every": 2}, 1, 5)
    with pytest.raises(DataError, match=r"calib\.state was saved with another recipe"):
        calibrate_onnx(model, data, state=state, resume=True, method="percentile")
    assert state.is_file()


def test_resume_without_a_state_file_starts_from_the_first_batch(model, tmp_path):
    state = tmp_path / "never-written.state"
    resumed = calibrate_onnx(model, data, state=state, resume=True, validate_batches=0)
    whole = calibrate_onnx(model, data, validate_batches=0)
    for name, entry in whole.scales.items():
        assert torch.equal(resumed.scales[name].scale, entry.scale)


def test_resume_needs_a_state_path(model):
    with pytest.raises(RecipeError, match=r"resume needs the state file"):
        calibrate_onnx(model, data, resume=True)


def test_resume_with_less_data_than_was_done_is_refused(model, tmp_path):
    state = tmp_path / "calib.state"
    run_killed(model, state, {"state_every": 2}, 1, 9)
    fewer = lambda: (batch(i) for i in range(5))  # noqa: E731
    with pytest.raises(DataError, match=r"has 8 batches of this pass done, .* has only 5"):
        calibrate_onnx(model, fewer, state=state, resume=True, validate_batches=0)
