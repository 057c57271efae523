"""The default target is ort, and under it int8 activations are uint8, as ONNX Runtime's own
quantizer makes them; ``--activation-format int8`` keeps them signed.

The oracle is the written model itself (the zero-point types of its DequantizeLinear nodes),
not the recipe that chose them.
"""

from __future__ import annotations

import json

import onnx
import pytest
from convgemm import WEIGHTS

from qcal_export.cli import main
from qcal_export.spec.recipe_options import UNSIGNED_ACTIVATIONS_NOTE


def _zero_point_types(path) -> dict[str, int]:
    """Quantized tensor -> the element type of its zero point, from the written model."""
    model = onnx.load(str(path))
    inits = {t.name: t.data_type for t in model.graph.initializer}
    types = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) > 2:
            types[node.input[0]] = inits.get(node.input[2])
    return types


@pytest.mark.parametrize(
    ("flags", "activation", "noted"),
    [
        ([], onnx.TensorProto.UINT8, True),
        (["--activation-format", "int8"], onnx.TensorProto.INT8, False),
    ],
)
def test_default_run_writes_uint8_activations_and_int8_weights(
    workdir, tmp_path, capsys, flags, activation, noted
):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    argv = ["calibrate", str(workdir / "model.onnx"), "--data", str(workdir / "data")]
    assert main([*argv, "-o", str(out), "--report", str(report), *flags]) == 0
    printed = capsys.readouterr().out
    written = json.loads(report.read_text())
    assert written["recipe"]["target"] == "ort"
    types = _zero_point_types(out)
    weights = {k: v for k, v in types.items() if any(k.startswith(w) for w in WEIGHTS)}
    activations = {k: v for k, v in types.items() if k not in weights}
    assert len(weights) == len(WEIGHTS) and set(weights.values()) == {onnx.TensorProto.INT8}
    assert activations and set(activations.values()) == {activation}
    assert (UNSIGNED_ACTIVATIONS_NOTE in written["plan_notes"]) is noted
    assert ("note: target ort: activations are uint8" in printed) is noted


@pytest.mark.parametrize(
    ("flags", "noted"),
    [([], True), (["--target", "tensorrt"], False), (["--format", "fp8"], False)],
)
def test_inspect_says_when_activations_default_to_uint8(workdir, capsys, flags, noted):
    assert main(["inspect", str(workdir / "model.onnx"), *flags]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert ("note: " + UNSIGNED_ACTIVATIONS_NOTE in printed) is noted
