"""Validate a QDQ model: onnx's full checker, then ONNX Runtime against the float model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from qcal_export.capture.data import DataSource, as_feed, model_inputs
from qcal_export.errors import ModelError
from qcal_export.graphs.model_io import PROTOBUF_LIMIT


def check_model(model: onnx.ModelProto, name: str, *, full: bool) -> None:
    """Run onnx's checker (with shape inference when ``full``); ModelError names the model."""
    if model.ByteSize() > PROTOBUF_LIMIT:
        return
    try:
        onnx.checker.check_model(model, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0]
        raise ModelError(f"{name} fails onnx's checker: {first}") from None


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
    candidate: ort.InferenceSession,
    model: onnx.ModelProto,
    source: DataSource,
    max_batches: int,
) -> dict[str, dict[str, float]]:
    """Max abs, relative L2 and cosine of each float graph output over ``max_batches`` batches."""
    inputs = model_inputs(model)
    names = [o.name for o in reference.get_outputs() if "float" in o.type]
    errors = {name: RunningError() for name in names}
    for index, item in enumerate(source.batches()):
        if index >= max_batches:
            break
        feed = as_feed(item, inputs, index)
        for name, ref, cand in zip(
            names, reference.run(names, feed), candidate.run(names, feed), strict=True
        ):
            errors[name].add(ref, cand)
    return {name: e.summary() for name, e in errors.items()}
