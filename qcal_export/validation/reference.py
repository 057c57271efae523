"""The ONNX reference evaluator for what ONNX Runtime cannot run: FLOAT4E2M1 tensors (ORT has no
FP4 kernels) and TensorRT's custom ops, implemented here as TensorRT documents them."""

from __future__ import annotations

import time

import numpy as np
import onnx
import torch
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from qcal_export.graphs.fp4_e8m0 import e8m0_unexpressed
from qcal_export.graphs.nvfp4 import TRT_DOMAIN
from qcal_export.onnx_io.weight_views import materialized
from qcal_export.spec.formats import NVFP4
from qcal_export.spec.granularity import PerBlock


class _TrtFP4DynamicQuantize(OpRun):
    """``trt::TRT_FP4DynamicQuantize`` as TensorRT defines it: per block of ``block_size`` along
    ``axis``, the FP8 scale ``fp8(block_amax / 6 / global_scale)`` and the E2M1 values of
    ``x / (fp8_scale * global_scale)``. Outputs hold the values as float32."""

    op_domain = TRT_DOMAIN

    def _run(self, x, global_scale, axis=-1, block_size=16, scale_type=None):
        granularity = PerBlock(axis, block_size)
        values = torch.from_numpy(np.array(x, dtype=np.float32))
        scale = torch.as_tensor(np.array(global_scale, dtype=np.float32)).reshape(())
        shape = tuple(values.shape)
        block_amax = granularity.unflatten(
            granularity.groups(values).abs().amax(-1), granularity.stat_shape(shape)
        )
        block_scales = NVFP4.block_scales(block_amax, scale)
        effective = granularity.expand(NVFP4.effective_scales(block_scales, scale), shape)
        codes = NVFP4.round_e2m1(values / effective)
        return codes.numpy(), block_scales.float().numpy()


class _TrtDequantizeLinear(OpRun):
    """``trt::DequantizeLinear``: ``x * scale``, the scale per tensor or per block."""

    op_domain = TRT_DOMAIN

    def _run(self, x, scale, axis=None, block_size=None):
        values = torch.from_numpy(np.array(x, dtype=np.float32))
        scale_t = torch.from_numpy(np.array(scale, dtype=np.float32))
        if block_size:
            scale_t = PerBlock(axis, block_size).expand(scale_t, tuple(values.shape))
        return ((values * scale_t).numpy(),)


_TRT_DEQUANTIZE = "TRT_DequantizeLinear"
TRT_OPS = [
    type(op_type, (implementation,), {})  # the evaluator matches a class by its name
    for op_type, implementation in (
        ("TRT_FP4DynamicQuantize", _TrtFP4DynamicQuantize),
        (_TRT_DEQUANTIZE, _TrtDequantizeLinear),
    )
]


class EvaluatorTimeout(Exception):
    """The reference evaluator ran past its deadline (``ReferenceRunner(deadline=...)``)."""


class _DeadlineEvaluator(ReferenceEvaluator):
    """The reference evaluator, stopped between two nodes once ``time.monotonic()`` passes
    ``deadline``: it logs every node it runs through ``_log``, the hook checked here."""

    deadline: float | None = None

    def _log(self, level: int, pattern: str, *args: object) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise EvaluatorTimeout(f"past its deadline at {pattern % args if args else pattern}")
        super()._log(level, pattern, *args)


class ReferenceRunner:
    """The ONNX reference evaluator behind ORT's ``run(names, feed)`` interface.

    The evaluator finds custom ops by name alone, so ``trt::DequantizeLinear`` is renamed in
    the copy it runs, to keep the default-domain DequantizeLinear its own. With a ``deadline``
    (a ``time.monotonic()`` value) a run still going then raises EvaluatorTimeout.
    """

    def __init__(self, model: onnx.ModelProto, deadline: float | None = None):
        model = materialized(model)  # the evaluator reads the weights from the proto
        if any(node.domain == TRT_DOMAIN for node in model.graph.node):
            for node in model.graph.node:
                if node.domain == TRT_DOMAIN and node.op_type == "DequantizeLinear":
                    node.op_type = _TRT_DEQUANTIZE
        self._evaluator = _DeadlineEvaluator(model, new_ops=TRT_OPS)
        self._evaluator.deadline = deadline

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._evaluator.run(names, feed)


EVALUATOR = "onnx.reference.ReferenceEvaluator"
"""The validator's name of the ONNX reference evaluator."""

ORT_UNSUPPORTED_TYPES = {TensorProto.FLOAT4E2M1, TensorProto.FLOAT8E8M0}


def needs_reference_evaluator(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds types or ops ONNX Runtime cannot run (FP4, E8M0 scales stored or
    computed for a Q/DQ, TensorRT's ops)."""
    graph = model.graph
    if e8m0_unexpressed(graph):
        return True
    if any(t.data_type in ORT_UNSUPPORTED_TYPES for t in graph.initializer):
        return True
    for node in graph.node:
        if node.domain == TRT_DOMAIN:
            return True
        output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), None)
        if output_dtype in ORT_UNSUPPORTED_TYPES:
            return True
    return False
