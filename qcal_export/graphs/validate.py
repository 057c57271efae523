"""Validate a QDQ model: onnx's full checker, then ONNX Runtime (or, for what ORT cannot run,
the ONNX reference evaluator) against the float model."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from qcal_export.capture.data import DataSource, feeds, model_inputs
from qcal_export.capture.onnxruntime import open_session
from qcal_export.errors import ModelError
from qcal_export.formats import NVFP4
from qcal_export.granularity import PerBlock
from qcal_export.graphs.model_io import inference_view, over_protobuf_limit
from qcal_export.graphs.nvfp4 import TRT_DOMAIN


def check_model(model: onnx.ModelProto, name: str, *, full: bool, path: Path | None = None) -> None:
    """Run onnx's checker (with shape inference when ``full``); ModelError names the model.

    A model past 2 GB is checked from its file ``path`` (the checker reads its external data
    there); without one, only its graph is checked, on a weightless view.
    """
    target: onnx.ModelProto | str = model
    if over_protobuf_limit(model):
        target = str(path) if path is not None else inference_view(model)
    try:
        onnx.checker.check_model(target, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise ModelError(
            f"{name} fails onnx's checker: {reason} (fix or re-export the model)"
        ) from None


@dataclass
class RunningError:
    """Running error of one graph output, accumulated in float64 over batches."""

    max_abs: float = 0.0
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    dot: float = 0.0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref = reference.astype(np.float64).ravel()
        cand = candidate.astype(np.float64).ravel()
        diff = cand - ref
        self.max_abs = max(self.max_abs, float(np.abs(diff).max(initial=0.0)))
        self.diff_sq += float(diff @ diff)
        self.ref_sq += float(ref @ ref)
        self.cand_sq += float(cand @ cand)
        self.dot += float(ref @ cand)

    def summary(self) -> dict[str, float]:
        norms = math.sqrt(self.ref_sq * self.cand_sq)
        return {
            "max_abs": self.max_abs,
            "rel_l2": math.sqrt(self.diff_sq / self.ref_sq)
            if self.ref_sq
            else math.sqrt(self.diff_sq),
            "cosine": self.dot / norms if norms else float(self.diff_sq == 0.0),
        }


def compare_outputs(
    reference: ort.InferenceSession,
    candidate: ort.InferenceSession | _ReferenceRunner,
    model: onnx.ModelProto,
    source: DataSource,
    max_batches: int,
) -> dict[str, dict[str, float]]:
    """Max abs, relative L2 and cosine of each float graph output over ``max_batches`` batches."""
    names = float_outputs(reference)
    errors = {name: RunningError() for name in names}
    for refs, cands in output_pairs(reference, candidate, model, source, max_batches):
        for name, ref, cand in zip(names, refs, cands, strict=True):
            errors[name].add(ref, cand)
    return {name: e.summary() for name, e in errors.items()}


def float_outputs(session: ort.InferenceSession) -> list[str]:
    """The names of a session's float outputs, in order: what output errors compare."""
    return [o.name for o in session.get_outputs() if "float" in o.type]


def output_pairs(
    reference: ort.InferenceSession,
    candidate: ort.InferenceSession | _ReferenceRunner,
    model: onnx.ModelProto,
    source: DataSource,
    max_batches: int | None = None,
) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
    """Per batch (the first ``max_batches``, or all), both models' float outputs."""
    inputs = model_inputs(model)
    names = float_outputs(reference)
    for feed in feeds(source, inputs, max_batches):
        yield reference.run(names, feed), candidate.run(names, feed)


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


class _ReferenceRunner:
    """The ONNX reference evaluator behind ORT's ``run(names, feed)`` interface.

    The evaluator finds custom ops by name alone, so ``trt::DequantizeLinear`` is renamed in
    the copy it runs, to keep the default-domain DequantizeLinear its own.
    """

    def __init__(self, model: onnx.ModelProto):
        if any(node.domain == TRT_DOMAIN for node in model.graph.node):
            model = onnx.ModelProto.FromString(model.SerializeToString())
            for node in model.graph.node:
                if node.domain == TRT_DOMAIN and node.op_type == "DequantizeLinear":
                    node.op_type = _TRT_DEQUANTIZE
        self._evaluator = ReferenceEvaluator(model, new_ops=TRT_OPS)

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._evaluator.run(names, feed)


ORT_UNSUPPORTED_TYPES = {TensorProto.FLOAT4E2M1}


def reference_runner(
    model: onnx.ModelProto, providers: list[str]
) -> tuple[ort.InferenceSession | _ReferenceRunner, str]:
    """A runner for the quantized model and the validator's name.

    ONNX Runtime where it has kernels for every op; the ONNX reference evaluator for FLOAT4E2M1
    tensors (ORT has no FP4 kernels) and TensorRT's custom ops (implemented here as TensorRT
    documents them).
    """
    if needs_reference_evaluator(model):
        return _ReferenceRunner(model), "onnx.reference.ReferenceEvaluator"
    return open_session(model, providers, "the quantized model"), f"onnxruntime ({providers[0]})"


def needs_reference_evaluator(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds types or ops ONNX Runtime cannot run (FP4, TensorRT's ops)."""
    graph = model.graph
    if any(t.data_type in ORT_UNSUPPORTED_TYPES for t in graph.initializer):
        return True
    for node in graph.node:
        if node.domain == TRT_DOMAIN:
            return True
        output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), None)
        if output_dtype in ORT_UNSUPPORTED_TYPES:
            return True
    return False
