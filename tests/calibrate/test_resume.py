"""Resumable calibration: a run killed mid-way (SIGKILL in a child process) and resumed from
its state file gives the scales of a run that was never interrupted, bit for bit.

The child calibrates the seq MLP of mlp.py on 12 deterministic batches and kills itself while
reading batch ``at`` of pass ``in_pass``; the parent resumes from the state it saved.
"""

from __future__ import annotations

import os
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
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
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
    "gptq": (
        {"format": "int4", "activation_format": "none", "weight_method": "gptq", "state_every": 3},
        1,
        7,
    ),
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


def test_the_state_records_the_config_and_other_outputs_still_resume(model, tmp_path):
    state = tmp_path / "calib.state"
    run_killed(model, state, {"state_every": 2, "method": "mse"}, 1, 5)
    saved = torch.load(state, weights_only=True)["identity"]
    assert saved["config"]["state"] == {"state": str(state), "state_every": 2, "resume": False}
    assert saved["config"]["quantization"]["method"] == "mse"
    assert saved["recipe"]["activation"]["method"] == "mse"
    report = tmp_path / "report.json"  # outputs and the verdict are no part of the identity
    resumed = calibrate_onnx(
        model,
        data,
        state=state,
        resume=True,
        method="mse",
        report=report,
        min_cosine=0.5,
        validate_batches=0,
        state_every=3,
    )
    whole = calibrate_onnx(model, data, method="mse", validate_batches=0)
    assert report.is_file() and not state.exists()
    for name, entry in whole.scales.items():
        assert torch.equal(resumed.scales[name].scale, entry.scale), name


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


class Interrupt(Exception):
    """Stops a run from inside its data, leaving the state file of its last save."""


def stopped_in_pass_2(index: int):
    passes = []

    def data():
        passes.append(1)
        for i in range(NUM_BATCHES):
            if len(passes) == 2 and i == index:
                raise Interrupt
            yield batch(i)

    return data


@pytest.fixture(scope="module")
def saved_state(model, tmp_path_factory) -> bytes:
    """The state file of an mse run stopped in pass 2 after 4 batches (saved every 2): the
    first pass's ranges and the second's losses."""
    path = tmp_path_factory.mktemp("state") / "calib.state"
    with pytest.raises(Interrupt):
        calibrate_onnx(
            model, stopped_in_pass_2(5), state=path, state_every=2, method="mse", validate_batches=0
        )
    return path.read_bytes()


def edited(state: bytes, tmp_path: Path, edit) -> bytes:
    """``state`` loaded, changed by ``edit(dict)`` and saved again as torch.save writes it."""
    path = tmp_path / "edit.state"
    path.write_bytes(state)
    saved = torch.load(path, weights_only=True)
    edit(saved)
    torch.save(saved, path)
    return path.read_bytes()


def flip_in_tensor(state: bytes, tmp_path: Path) -> bytes:
    """One bit flipped inside a saved tensor's bytes: torch.load reads it without complaint."""
    path = tmp_path / "flip.state"
    path.write_bytes(state)
    saved = torch.load(path, weights_only=True)
    losses = next(s["losses"] for s in saved["snapshots"].values() if "losses" in s)
    at = state.index(losses.numpy().tobytes())
    damaged = bytearray(state)
    damaged[at + 3] ^= 0x10
    path.write_bytes(bytes(damaged))
    reloaded = torch.load(path, weights_only=True)
    assert not torch.equal(
        next(s["losses"] for s in reloaded["snapshots"].values() if "losses" in s), losses
    )
    return bytes(damaged)


def reshaped(saved: dict) -> None:
    snapshot = next(s for s in saved["snapshots"].values() if "losses" in s)
    snapshot["losses"] = torch.zeros(3, 7, dtype=torch.float64)


DAMAGES = {
    "truncated": (lambda s, t: s[: len(s) // 2], r"damaged \(.+\): delete it$"),
    "empty": (lambda s, t: b"", r"damaged \(.+\): delete it$"),
    "bit-in-a-tensor": (flip_in_tensor, r"damaged \(its contents do not match their sha256\)"),
    "wrong-shape": (lambda s, t: edited(s, t, reshaped), r"do not match their sha256"),
    "key-missing": (
        lambda s, t: edited(s, t, lambda d: d.pop("batches")),
        r"damaged \(keys \[.*\], not \[.*'batches'",
    ),
    "pass-a-string": (
        lambda s, t: edited(s, t, lambda d: d.update({"pass": "1"})),
        r"damaged \(pass '1', batches 4, first pass 12\)",
    ),
    "snapshots-not-tensors": (
        lambda s, t: edited(s, t, lambda d: d.update({"snapshots": {"x": {"amax": 1.0}}})),
        r"damaged \(snapshots are not tensors by name\)",
    ),
    "identity-not-a-mapping": (
        lambda s, t: edited(s, t, lambda d: d.update({"identity": ["model"]})),
        r"damaged \(identity list, not a mapping\)",
    ),
    "other-schema": (
        lambda s, t: edited(s, t, lambda d: d.update({"schema": "qcal_export.state/1"})),
        r"is not a qcal_export\.state/2 file: delete it$",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_damaged_state_file_is_refused_and_kept(model, saved_state, tmp_path, case):
    """A state file torn, edited or with flipped bits is a DataError naming it (torch.load reads
    many such files without complaint: the saved sha256 catches them); it is left as it was."""
    damage, message = DAMAGES[case]
    state = tmp_path / "calib.state"
    state.write_bytes(damage(saved_state, tmp_path))
    before = state.read_bytes()
    with pytest.raises(DataError, match=rf"state file .*calib\.state (is )?.*{message}"):
        calibrate_onnx(model, data, state=state, resume=True, method="mse", validate_batches=0)
    assert state.read_bytes() == before


def test_intact_saved_state_resumes(model, saved_state, tmp_path):
    state = tmp_path / "calib.state"
    state.write_bytes(saved_state)
    resumed = calibrate_onnx(
        model, data, state=state, resume=True, method="mse", validate_batches=0
    )
    whole = calibrate_onnx(model, data, method="mse", validate_batches=0)
    for name, entry in whole.scales.items():
        assert torch.equal(resumed.scales[name].amax, entry.amax), name


def test_a_pipe_as_state_file_is_refused_unread(model, tmp_path):
    state = tmp_path / "calib.state"
    os.mkfifo(state)
    with pytest.raises(DataError, match=r"calib\.state is not a regular file"):
        calibrate_onnx(model, data, state=state, resume=True, validate_batches=0)
