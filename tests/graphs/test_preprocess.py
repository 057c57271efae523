"""preprocess: weight sub-graphs folded into initializers, with outputs equal to the original's
in ONNX Runtime; inputs, outputs and subgraphs kept; weights it cannot find named with why, and
their nodes not counted as quantized; ``qcal inspect`` shows what it would do."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from exporters import CORPUS
from onnx import TensorProto, helper, numpy_helper

from qcal_export import calibrate_onnx
from qcal_export.cli import main
from qcal_export.graphs.preprocess import preprocess
from qcal_export.onnx_io import model_io
from qcal_export.onnx_io.model_io import load_model, save_model

FLOAT = TensorProto.FLOAT


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    return twin


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_folded_models_compute_what_the_originals_do(name):
    """Cast float16 -> float32, Transpose, Reshape and Identity are exact: outputs are equal."""
    export = CORPUS[name]()
    result = preprocess(copy(export.model))
    onnx.checker.check_model(result.model, full_check=True)
    for batch in export.batches[:3]:
        want, got = run(export.model, batch), run(result.model, batch)
        np.testing.assert_array_equal(got[0], want[0])
    graph = result.model.graph
    initializers = {t.name for t in graph.initializer}
    assert [i.name for i in graph.input if i.name not in initializers] == ["x"]
    assert [o.name for o in graph.output] == ["y"]


def test_an_initializer_input_stays_listed_unless_a_weight_is_folded_from_it():
    """w1 is read directly (the export step drops its input entry, issue 21); w2_t is folded
    through a Transpose, so it is made a constant here."""
    result = preprocess(copy(CORPUS["initializers_as_inputs"]().model))
    assert [i.name for i in result.model.graph.input] == ["x", "w1"]
    assert "initializer(s) ['w2_t'] were also graph inputs" in result.changes[0]


def test_constant_cast_transpose_becomes_one_initializer():
    result = preprocess(copy(CORPUS["fp16_cast"]().model))
    graph = result.model.graph
    assert [n.op_type for n in graph.node] == ["MatMul", "Tanh", "Gemm"]
    weights = {t.name: t for t in graph.initializer}
    assert graph.node[0].input[1] in weights and graph.node[2].input[1] in weights
    w1 = weights[graph.node[0].input[1]]
    assert (w1.data_type, list(w1.dims)) == (FLOAT, [16, 32])
    assert result.counts["weight_nodes_folded"] == 3
    assert result.counts["weights_found"] == 2


def test_only_weight_sub_graphs_fold():
    """A constant-only chain that computes no weight (an Add bias behind a Cast) stays."""
    bias = numpy_helper.from_array(np.arange(4, dtype=np.float16), "b16")
    nodes = [
        helper.make_node("Cast", ["b16"], ["b"], "cast_bias", to=FLOAT),
        helper.make_node("Add", ["x", "b"], ["y"], "add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", FLOAT, [2, 4])],
        [bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = preprocess(model)
    assert [n.name for n in result.model.graph.node] == ["cast_bias", "add"]
    assert result.changes == ["shape inference recorded the type of 1 tensor(s)"]


def if_model() -> onnx.ModelProto:
    """y = If(c, then: x @ Transpose(W1), else: x @ W2 const) with Constants in each branch."""
    rng = np.random.default_rng(0)

    def branch(name: str, transpose: bool) -> onnx.GraphProto:
        w = rng.standard_normal((4, 4)).astype(np.float32)
        nodes = [helper.make_node("Constant", [], [f"{name}_w"], value=numpy_helper.from_array(w))]
        weight = f"{name}_w"
        if transpose:
            nodes.append(helper.make_node("Transpose", [weight], [f"{name}_wt"], perm=[1, 0]))
            weight = f"{name}_wt"
        nodes.append(helper.make_node("MatMul", ["h", weight], [f"{name}_y"]))
        out = helper.make_tensor_value_info(f"{name}_y", FLOAT, [2, 4])
        return helper.make_graph(nodes, name, [], [out])

    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w_t")
    nodes = [
        helper.make_node("Transpose", ["w_t"], ["w"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node(
            "If",
            ["c"],
            ["y"],
            then_branch=branch("then", True),
            else_branch=branch("else", False),
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", FLOAT, [2, 4]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", FLOAT, [2, 4])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_subgraphs_stay_valid_and_compute_the_same():
    model = if_model()
    result = preprocess(copy(model))
    onnx.checker.check_model(result.model, full_check=True)
    assert result.model.graph.node[0].op_type == "MatMul"
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        np.testing.assert_array_equal(run(result.model, feeds)[0], run(model, feeds)[0])


def split_weights_model() -> onnx.ModelProto:
    """A packed weight split in three (a fused QKV export): the folder takes no multi-output
    op, so the three MatMul weights stay computed; and a Conv whose weight is a graph input."""
    rng = np.random.default_rng(2)
    packed = rng.standard_normal((8, 24)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["packed"], value=numpy_helper.from_array(packed)),
        helper.make_node("Split", ["packed"], ["wq", "wk", "wv"], "split", axis=1, num_outputs=3),
        *[helper.make_node("MatMul", ["x", f"w{p}"], [p], f"mm_{p}") for p in "qkv"],
        helper.make_node("Sum", ["q", "k", "v"], ["s"], "sum"),
        helper.make_node("Reshape", ["s", "shape"], ["img"], "reshape"),
        helper.make_node("Conv", ["img", "kernel"], ["y"], "conv"),
    ]
    shape = numpy_helper.from_array(np.array([2, 1, 2, 4], np.int64), "shape")
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", FLOAT, [2, 8]),
            helper.make_tensor_value_info("kernel", FLOAT, [2, 1, 1, 1]),
        ],
        [helper.make_tensor_value_info("y", FLOAT, [2, 2, 2, 4])],
        [shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_weights_it_cannot_find_are_named_with_why():
    result = preprocess(split_weights_model())
    assert sorted(result.unfound_weights) == ["conv", "mm_k", "mm_q", "mm_v"]
    assert result.unfound_weights["mm_q"] == (
        "MatMul 'mm_q': weight input 1 'wq' is computed by Split 'split', which could not be "
        "folded: quantized per tensor as an activation, not as a weight"
    )
    assert result.unfound_weights["conv"] == (
        "Conv 'conv': weight input 1 'kernel' is a graph input, fed at run time (store it as an "
        "initializer to quantize it): that weight stays float"
    )


def test_nodes_with_an_unfound_weight_do_not_count_as_quantized(tmp_path, caplog):
    model = split_weights_model()
    path = tmp_path / "split.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(3)
    batches = [
        {
            "x": rng.standard_normal((2, 8)).astype(np.float32),
            "kernel": rng.standard_normal((2, 1, 1, 1)).astype(np.float32),
        }
        for _ in range(4)
    ]
    with caplog.at_level(logging.WARNING):
        result = calibrate_onnx(path, batches, provider="cpu", format="int8")
    assert result.report["quantized_nodes"] == []
    assert sorted(result.report["partially_quantized_nodes"]) == ["conv", "mm_k", "mm_q", "mm_v"]
    assert sorted(result.report["preprocess"]["unfound_weights"]) == [
        "conv",
        "mm_k",
        "mm_q",
        "mm_v",
    ]
    warned = [r.getMessage() for r in caplog.records if "weight input 1" in r.getMessage()]
    assert len(warned) == 4


def test_a_model_with_nothing_to_fold_keeps_its_graph():
    """The transformer's weights are initializers: its Constant (a shape) stays a node."""
    model = CORPUS["transformer_block"]().model
    before = [(n.name, list(n.input)) for n in model.graph.node]
    result = preprocess(model)
    assert result.model is model
    assert [(n.name, list(n.input)) for n in model.graph.node] == before
    assert result.counts == {"types_inferred": len(model.graph.value_info), "types_unknown": 0}


def test_preprocessing_twice_changes_nothing_more():
    once = preprocess(copy(CORPUS["nhwc_conv"]().model))
    twice = preprocess(copy(once.model))
    assert twice.changes == []
    assert twice.model.graph == once.model.graph


def test_external_data_and_models_past_the_protobuf_limit(tmp_path, monkeypatch):
    """Folded weights of a model with external data are saved as external data again; past
    2 GB (the limit lowered here) shape inference works on a view without the large weights."""
    source = tmp_path / "ext.onnx"
    onnx.save(
        CORPUS["fp16_cast"]().model, str(source), save_as_external_data=True, size_threshold=0
    )
    loaded = load_model(source)
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1000)
    result = preprocess(loaded.proto)
    assert result.counts["weights_found"] == 2 and result.counts["types_inferred"] > 0
    monkeypatch.undo()
    out = save_model(result.model, tmp_path / "out.onnx", external_data=True)
    batch = CORPUS["fp16_cast"]().batches[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, batch)
    want = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, batch)
    np.testing.assert_array_equal(got[0], want[0])


def test_inspect_shows_what_preprocessing_would_do(tmp_path, capsys):
    path = tmp_path / "split.onnx"
    onnx.save(split_weights_model(), str(path))
    before = path.read_bytes()
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pre-processing: lifted 1 Constant node(s) to initializers" in out
    assert "warning: MatMul 'mm_q': weight input 1 'wq' is computed by Split 'split'" in out
    assert path.read_bytes() == before


def test_what_the_folder_does_beyond_weights_is_listed():
    """onnxscript's folder reads through an Identity on an activation wherever it runs: the
    change is listed, and the outputs stay equal."""
    weight = np.arange(16, dtype=np.float32).reshape(4, 4) / 16
    nodes = [
        helper.make_node("Constant", [], ["w"], "w", value=numpy_helper.from_array(weight)),
        helper.make_node("Identity", ["x"], ["x_copy"], "copy"),
        helper.make_node("MatMul", ["x_copy", "w"], ["y"], "mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", FLOAT, [2, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = preprocess(copy(model))
    assert result.changes[:3] == [
        "lifted 1 Constant node(s) to initializers",
        "the folder rewired 1 node input(s) past nodes that copy their input (Identity-like), "
        "same values: ['mm:0']",
        "1 weight(s) now initializers: ['w']",
    ]
    x = np.random.default_rng(4).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(result.model, {"x": x})[0], run(model, {"x": x})[0])
