"""Fuzzing ``qcal calibrate``: generated recipes, method options, numeric arguments and damaged
data, scales and state files, through the CLI's ``main()``.

Every run ends one of two ways: exit 0 with a QDQ model that passes the full checker and loads,
a loadable scales file and report; or exit 2 with exactly one ``qcal: error:`` line (below the
bars of passes that completed before the fault, if any) and nothing written. Never an exception
out of ``main``, never a changed input (sha256 of the model, data, recipe, scales and state files
before and after), never a temporary file left behind. Most examples are valid with at most one
fault, so that runs go deep. The model and data are convgemm.py's; each example writes into its
own fresh directory, so outputs never collide with inputs. Derandomized, no example database:
CI runs the same examples every time. The generated inputs are fuzz_inputs.py's.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from fuzz_inputs import ARGUMENTS, ARRAYS, OPTION_KEYS, damage_bytes, garble, option_value, recipes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx.reference import ReferenceEvaluator
from safetensors.torch import load_file

from qcal_export import calibrate_onnx
from qcal_export.cli import main
from qcal_export.spec.methods import METHOD_OPTIONS, method_names

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PROGRESS = re.compile(r"^calibrating \(pass \d\)")
"""A finished pass's progress bar stays above a later error line: the only other line allowed."""


# ---- one run and what it must leave --------------------------------------------------------


def sha256s(paths: list[Path]) -> dict[str, str]:
    """sha256 of each file, and of each file inside each directory, by path."""
    files = [f for p in paths for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def assert_complete_outputs(out: Path) -> None:
    """The QDQ model passes the full checker and loads (ONNX Runtime; the reference evaluator
    for FLOAT4E2M1, which ORT has no kernel for; TensorRT's custom ops: the checker only);
    the scales and report load."""
    model = onnx.load(out / "q.onnx")
    onnx.checker.check_model(model, full_check=True)
    trt = any(n.domain == "trt" for n in model.graph.node)
    fp4 = onnx.TensorProto.FLOAT4E2M1 in [t.data_type for t in model.graph.initializer] + [
        a.i for n in model.graph.node for a in n.attribute if a.name == "output_dtype"
    ]
    if fp4 and not trt:
        ReferenceEvaluator(model)
    elif not trt:
        ort.InferenceSession(str(out / "q.onnx"), providers=["CPUExecutionProvider"])
    assert load_file(out / "s.safetensors")
    assert "tensors" in json.loads((out / "r.json").read_text())


def run_cli(capsys, argv: list[str], inputs: list[Path], out: Path, state: Path | None = None):
    """``qcal calibrate argv -o/--scales/--report`` into ``out``, checked as the module says.

    ``state`` (an input too) is deleted by a completed run, by design, and kept by a failed one.
    """
    capsys.readouterr()
    before = sha256s(inputs + ([state] if state else []))
    outputs = ["-o", str(out / "q.onnx"), "--scales", str(out / "s.safetensors")]
    code = main(["calibrate", *argv, *outputs, "--report", str(out / "r.json")])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert code in (0, 2), captured.err
    if code == 2:
        lines = captured.err.strip().splitlines()
        assert lines and lines[-1].startswith("qcal: error: "), captured.err
        assert all(PROGRESS.match(line) for line in lines[:-1]), captured.err
        assert captured.out == ""
        assert list(out.iterdir()) == []  # nothing written
    else:
        assert_complete_outputs(out)
    if state is not None and code == 0:
        assert not state.exists()  # removed once calibration completed
        before.pop(str(state))
    assert sha256s(inputs + ([state] if state and code == 2 else [])) == before  # unchanged
    leftovers = [p for p in out.parent.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    return code


@contextmanager
def example_dir() -> Iterator[Path]:
    """A fresh directory per example (``out/`` inside it for the outputs)."""
    with tempfile.TemporaryDirectory(prefix="qcal-fuzz-") as root:
        (Path(root) / "out").mkdir()
        yield Path(root)


# ---- recipes ---------------------------------------------------------------------------------


@settings(FUZZ, max_examples=150)
@given(data=recipes(), damage=garble, as_json=st.booleans())
def test_generated_recipes(workdir, capsys, data, damage, as_json):
    """A recipe file (YAML or JSON), now and then with a character or a non-UTF-8 byte put in."""
    text = (json.dumps(data) if as_json else yaml.safe_dump(data)).encode()
    if damage is not None:
        at, inserted = damage
        text = text[:at] + inserted + text[at:]
    with example_dir() as root:
        recipe = root / ("recipe.json" if as_json else "recipe.yaml")
        recipe.write_bytes(text)
        model, data_dir = workdir / "model.onnx", workdir / "data"
        argv = [str(model), "--data", str(data_dir), "--recipe", str(recipe)]
        run_cli(capsys, argv, [model, data_dir, recipe], root / "out")


# ---- method options and numeric arguments ----------------------------------------------------


@settings(FUZZ, max_examples=150)
@given(
    fmt=st.sampled_from(["int8", "int8", "uint8", "int4", "fp8", "nvfp4"]),
    method=st.sampled_from(method_names()),
    weight_method=st.one_of(
        st.none(),
        st.sampled_from(["max", "mse", "shrink-mse", "percentile"]),
        st.sampled_from(method_names()),
    ),
    draw=st.data(),
    arguments=st.dictionaries(
        st.sampled_from(sorted(ARGUMENTS)), st.just(None), max_size=4
    ).flatmap(lambda keys: st.fixed_dictionaries({k: ARGUMENTS[k] for k in keys})),
    one_file=st.booleans(),
    layer_view=st.booleans(),
    float_conv=st.booleans(),
)
def test_generated_options_and_arguments(
    workdir, capsys, fmt, method, weight_method, draw, arguments, one_file, layer_view, float_conv
):
    """Formats, methods, ``--option`` values (finite, nan, inf, huge, negative, not numbers) and
    numeric arguments, on the data directory or one .npz file (where --batch-size splits)."""
    taken = METHOD_OPTIONS.get(method, set()) | METHOD_OPTIONS.get(weight_method, set())
    fitting = st.sampled_from(sorted(taken) or OPTION_KEYS)
    keys = st.one_of(fitting, fitting, fitting, st.sampled_from(OPTION_KEYS))
    method_options = draw.draw(st.lists(st.tuples(keys, option_value), max_size=3))
    model = workdir / "model.onnx"
    data = workdir / "data" / "batch_00.npz" if one_file else workdir / "data"
    with example_dir() as root:
        argv = [str(model), "--data", str(data), "--format", fmt, "--method", method]
        argv += ["--weight-method", weight_method] if weight_method else []
        argv += [f"--option={key}={value}" for key, value in method_options]
        argv += ["--layer-view"] if layer_view else []
        argv += ["--exclude-op-types", "Conv"] if float_conv else []
        for flag, value in arguments.items():
            argv.append(f"{flag}={value}")
        if "--state-every" in arguments:
            argv += ["--state", str(root / "calib.state")]
        run_cli(capsys, argv, [model, workdir / "data"], root / "out")


# ---- damaged data, scales and state files ----------------------------------------------------


class Stop(Exception):
    """Ends a run from inside its data, as a kill would, leaving its last saved state."""


@pytest.fixture(scope="module")
def saved(workdir, tmp_path_factory) -> dict[str, bytes]:
    """A scales file of an int8 max run, and the state file of an mse run stopped in pass 2
    after 2 batches (saved after every batch): what the damaged-file examples start from."""
    root = tmp_path_factory.mktemp("saved")
    model = workdir / "model.onnx"
    calibrate_onnx(model, workdir / "data", scales=root / "s.safetensors", validate_batches=0)
    batches = [dict(np.load(p)) for p in sorted((workdir / "data").iterdir())]
    passes = []

    def stopped():
        passes.append(1)
        for i, batch in enumerate(batches):
            if len(passes) == 2 and i == 2:
                raise Stop
            yield batch

    with pytest.raises(Stop):
        calibrate_onnx(model, stopped, method="mse", state=root / "calib.state", state_every=1)
    return {name: (root / name).read_bytes() for name in ("s.safetensors", "calib.state")}


@settings(FUZZ, max_examples=150)
@given(
    target=st.sampled_from(["data", "data", "scales", "state"]),
    how=st.sampled_from(["truncate", "flip", "flip", "empty", "array", "intact"]),
    at=st.floats(0, 1),
    bit=st.integers(0, 7),
    array=st.sampled_from(sorted(ARRAYS)),
    key=st.sampled_from(["x", "y"]),
    index=st.integers(0, 3),
)
def test_damaged_files(workdir, saved, capsys, target, how, at, bit, array, key, index):
    """A batch file, the --scales-in file or the --resume state file truncated, emptied, with a
    flipped bit, or intact; a batch file rewritten with an array of another dtype, shape or
    name, or with non-finite or extreme values."""
    model = workdir / "model.onnx"
    with example_dir() as root:
        data = root / "data"
        shutil.copytree(workdir / "data", data)
        argv, state = [str(model), "--data", str(data)], None
        if target == "data":
            path = sorted(data.iterdir())[index]
            if how == "array":
                np.savez(path, **{key: ARRAYS[array](np.load(path)["x"])})
            else:
                path.write_bytes(damage_bytes(path.read_bytes(), how, at, bit))
        elif target == "scales":
            path = root / "s-in.safetensors"
            path.write_bytes(damage_bytes(saved["s.safetensors"], how, at, bit))
            argv += ["--scales-in", str(path)]
        else:
            state = root / "calib.state"
            state.write_bytes(damage_bytes(saved["calib.state"], how, at, bit))
            argv += ["--method", "mse", "--state", str(state), "--resume"]
        inputs = [model, data] + ([path] if target == "scales" else [])
        run_cli(capsys, argv, inputs, root / "out", state=state)


def test_an_intact_state_resumes_to_exit_0(workdir, saved, capsys):
    """The fuzzed state file is a real one: undamaged, it resumes and completes."""
    with example_dir() as root:
        state = root / "calib.state"
        state.write_bytes(saved["calib.state"])
        argv = [str(workdir / "model.onnx"), "--data", str(workdir / "data"), "--method", "mse"]
        argv += ["--state", str(state), "--resume"]
        inputs = [workdir / "model.onnx", workdir / "data"]
        assert run_cli(capsys, argv, inputs, root / "out", state=state) == 0
