"""Shared by the FP8 checkpoint tests: each linear layer's weight as the exported QDQ model's
DequantizeLinear gives it, run in ONNX Runtime on its own. A plain module (pytest's prepend
import mode puts this folder on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from qcal_export.artifacts.onnx_layers import layer_name


def graph_weights(
    float_model: Path, qdq_model: Path, elem_type: int = onnx.TensorProto.FLOAT
) -> dict[str, np.ndarray]:
    """{layer name: [out, in] of ``elem_type``} of every MatMul/Gemm whose weight a
    DequantizeLinear gives in ``qdq_model``; names from the float model's weight and node names."""
    float_graph = onnx.load(str(float_model), load_external_data=False).graph
    float_inits = {t.name for t in float_graph.initializer}
    names = {
        n.name: layer_name(n.input[1], n.name)
        for n in float_graph.node
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in float_inits
    }
    graph = onnx.load(str(qdq_model)).graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    weights = {}
    for node in graph.node:
        dq = producer.get(node.input[1]) if node.name in names else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        values = _run_alone(dq, [inits[name] for name in dq.input if name], elem_type)
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        weights[names[node.name]] = values if trans_b else values.T
    return weights


def _run_alone(
    dq: onnx.NodeProto, initializers: list[onnx.TensorProto], elem_type: int
) -> np.ndarray:
    """The DequantizeLinear node's output, its inputs being ``initializers``."""
    out = helper.make_tensor_value_info(dq.output[0], elem_type, None)
    graph = helper.make_graph([dq], "dq", [], [out], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {})[0]
