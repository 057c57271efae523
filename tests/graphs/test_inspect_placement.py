"""``qcal inspect --target``: the printed placement is the plan a calibrate run would use.

The tensors printed with Q/DQ, their scale groups and the planned nodes must equal those of
``find_targets`` on the same model (computed here, not parsed from the printout's own source);
the two targets differ where their rules say; the tensors left float are named with why."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from error_lines import assert_one_error_line
from onnx import TensorProto, helper, numpy_helper
from placement_models import attention_model, cnn_model

from qcal_export import cli_args
from qcal_export.cli import main
from qcal_export.graphs.targets import find_targets
from qcal_export.spec.recipe import Recipe

MODELS = {"cnn": cnn_model, "attention": attention_model}


def _inspect(capsys, path, *options: str) -> list[str]:
    assert main(["inspect", str(path), *options]) == 0
    return capsys.readouterr().out.splitlines()


def _printed(lines: list[str]) -> dict[str, object]:
    """The placement's lines parsed: Q/DQ tensors with their scale, groups, nodes, floats."""
    tensors = {}
    for line in lines:
        found = re.match(r"Q/DQ (\S+) \((\w+), (own scale|scale of (\S+))\)", line)
        if found:
            tensors[found[1]] = (found[2], found[4] or found[1])
    groups = {
        m[1]: m[2].split(", ")
        for m in map(re.compile(r"scale group (\S+): (.*)").match, lines)
        if m
    }
    nodes = [m[1] for m in map(re.compile(r"node (\S+) \(").match, lines) if m]
    floats = {m[1]: m[2] for m in map(re.compile(r"float (node \S+|\S+): (.*)").match, lines) if m}
    count = next(line for line in lines if line.startswith("placement (--target"))
    return {"tensors": tensors, "groups": groups, "nodes": nodes, "floats": floats, "count": count}


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
@pytest.mark.parametrize("name", list(MODELS))
def test_printed_placement_is_the_plan(tmp_path, capsys, name, target):
    model = MODELS[name]()
    onnx.save(model, str(tmp_path / "m.onnx"))
    printed = _printed(_inspect(capsys, tmp_path / "m.onnx", "--target", target))
    plan = find_targets(model, Recipe(target=target))
    expected = {t: ("activation", t) for t in plan.activations}
    expected |= {t: ("activation", e.source) for t, e in plan.shared.items()}
    expected |= {t: ("weight", t) for t in plan.weights}
    assert printed["tensors"] == expected
    groups: dict[str, set[str]] = {}
    for tensor, entry in plan.shared.items():
        groups.setdefault(entry.source, {entry.source}).add(tensor)
    assert {root: set(ts) for root, ts in printed["groups"].items()} == groups
    assert printed["nodes"] == plan.nodes
    activations = len(plan.activations) + len(plan.shared)
    assert (
        f"{len(plan.nodes)} nodes quantized; Q/DQ on {activations} activations"
        in (printed["count"])
    )


def test_targets_differ_where_their_rules_say(tmp_path, capsys):
    onnx.save(cnn_model(), str(tmp_path / "cnn.onnx"))
    ort = _printed(_inspect(capsys, tmp_path / "cnn.onnx", "--target", "ort"))
    trt = _printed(_inspect(capsys, tmp_path / "cnn.onnx", "--target", "tensorrt"))
    # ort quantizes the outputs of its integer kernels (convs, GlobalAveragePool); TensorRT
    # fuses them, and quantizes no tensor that ort leaves float
    assert set(ort["tensors"]) - set(trt["tensors"]) == {"t1", "t2", "t3", "g"}
    assert set(trt["tensors"]) <= set(ort["tensors"])
    # MaxPool and Flatten pass their input's integers on under ort: one scale for both
    assert ort["groups"] == {"a": ["a", "p"], "g": ["g", "f"]} and trt["groups"] == {}
    assert trt["tensors"]["p"] == ("activation", "p")
    # the Gemm's output is the graph output: ort would quantize it, qcal keeps it float
    assert ort["floats"] == {"y": "graph output of node fc: the model's outputs stay float"}
    assert trt["floats"] == {}
    assert "concat" in ort["nodes"] and "concat" not in trt["nodes"]


def _masked_attention() -> onnx.ModelProto:
    """s = x @ w; Add(s, (1 - mask) * -10000) -> Softmax -> MatMul: an attention mask."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["s"], "mm"),
        helper.make_node("Sub", ["one", "mask"], ["inv"], "sub"),
        helper.make_node("Mul", ["inv", "big"], ["bias"], "mul"),
        helper.make_node("Add", ["s", "bias"], ["masked"], "add"),
        helper.make_node("Softmax", ["masked"], ["pr"], "softmax", axis=-1),
        helper.make_node("MatMul", ["pr", "x"], ["y"], "pv"),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(-10000.0, np.float32), "big"),
    ]
    graph = helper.make_graph(
        nodes,
        "masked",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sentinel_tensors_are_left_float_with_why(tmp_path, capsys):
    onnx.save(_masked_attention(), str(tmp_path / "m.onnx"))
    printed = _printed(_inspect(capsys, tmp_path / "m.onnx", "--target", "ort"))
    sentinels = {t for t, why in printed["floats"].items() if why.startswith("sentinel values")}
    assert sentinels == {"big", "bias", "masked"}
    assert "attention mask" in printed["floats"]["masked"]
    assert not sentinels & set(printed["tensors"])
    assert {"mul", "add"}.isdisjoint(printed["nodes"])
    assert {"s", "pr", "x", "w"} <= set(printed["tensors"])


def test_options_change_the_plan_as_calibrate_would(tmp_path, capsys):
    onnx.save(cnn_model(), str(tmp_path / "cnn.onnx"))
    path = tmp_path / "cnn.onnx"
    excluded = _printed(_inspect(capsys, path, "--target", "ort", "--exclude", "c2"))
    assert excluded["floats"]["node c2"] == "excluded by the recipe"
    assert "c2" not in excluded["nodes"] and "w2" not in excluded["tensors"]
    weights_only = _printed(_inspect(capsys, path, "--activation-format", "none"))
    assert {kind for kind, _ in weights_only["tensors"].values()} == {"weight"}
    assert weights_only["floats"] == {}  # no activation Q/DQ: no output left float by choice
    # weight-only and block formats keep to the compute ops' inputs whatever the target
    int4 = _printed(_inspect(capsys, path, "--target", "ort", "--format", "int4"))
    assert int4["groups"] == {} and set(int4["nodes"]) == {"c1", "c2", "c3", "fc"}


def test_a_large_plan_prints_the_count_and_details_on_request(tmp_path, capsys, monkeypatch):
    onnx.save(cnn_model(), str(tmp_path / "cnn.onnx"))
    monkeypatch.setattr(cli_args, "PLACEMENT_DETAIL_NODES", 3)
    lines = _inspect(capsys, tmp_path / "cnn.onnx", "--target", "ort")
    assert not _printed(lines)["tensors"] and "pass --placement" in lines[-1]
    assert "9 nodes quantized" in _printed(lines)["count"]
    lines = _inspect(capsys, tmp_path / "cnn.onnx", "--target", "ort", "--placement")
    assert len(_printed(lines)["tensors"]) == 14


def test_nvfp4_plans_a_cnn_at_its_compute_ops_inputs(tmp_path, capsys):
    """Conv activations in blocks along the channels: no refusal; block formats get no
    placement beyond the compute ops' inputs, whatever the target."""
    onnx.save(cnn_model(), str(tmp_path / "cnn.onnx"))
    lines = _inspect(capsys, tmp_path / "cnn.onnx", "--format", "nvfp4", "--target", "ort")
    printed = _printed(lines)
    assert printed["nodes"] == ["c1", "c2", "c3", "fc"]
    assert set(printed["tensors"]) == {"x", "r1", "p", "f", "w1", "w2", "w3", "wfc"}


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        (["--recipe", "missing.yaml"], r"recipe file missing.yaml does not exist"),
        (["--target", "tflite"], r"--target: invalid choice: 'tflite'"),
        (["--format", "int8", "--weight-method", "max"], r"unrecognized arguments"),
    ],
)
def test_bad_inspect_options_are_one_error_line(tmp_path, capsys, monkeypatch, options, pattern):
    onnx.save(cnn_model(), str(tmp_path / "cnn.onnx"))
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "cnn.onnx", *options]) == 2
    assert_one_error_line(capsys.readouterr(), pattern)
