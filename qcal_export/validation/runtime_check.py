"""ONNX Runtime's graph optimizations against the graph they optimize: sessions at a chosen level,
the margin that tells other rounding from other math, and the search for the optimizer at fault.

ORT rewrites QDQ graphs into fused kernels at its default level (ORT_ENABLE_ALL); some valid
graphs fail to run or compute other values that way. With optimizations off ORT runs each node
as the ONNX spec defines it, so that session is the reference the default one is held to.
"""

from __future__ import annotations

import contextlib
import math
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from qcal_export.capture.onnxruntime import ORT_ERRORS
from qcal_export.onnx_io.model_io import over_protobuf_limit
from qcal_export.onnx_io.weight_sessions import paging_out, session_initializers

Level = ort.GraphOptimizationLevel
LEVELS = [("basic", Level.ORT_ENABLE_BASIC), ("extended", Level.ORT_ENABLE_EXTENDED)]
LEVELS += [("layout", Level.ORT_ENABLE_LAYOUT)] if hasattr(Level, "ORT_ENABLE_LAYOUT") else []
LEVELS += [("all", Level.ORT_ENABLE_ALL)]
"""ORT's optimization levels in the order they add transformers; "all" is the default."""

OPTIMIZERS = (
    "QDQSelectorActionTransformer",
    "Level2_RuleBasedTransformer",
    "Level1_RuleBasedTransformer",
    "WeightBiasQuantization",
    "DoubleQDQPairsRemover",
    "QDQFinalCleanupTransformer",
    "MatMulIntegerToFloatFusion",
    "MatMulNBitsFusion",
    "ConvActivationFusion",
    "GemmActivationFusion",
    "QDQPropagationTransformer",
    "QDQS8ToU8Transformer",
    "ConstantSharing",
    "CommonSubexpressionElimination",
    "ConstantFolding",
    "MatMulAddFusion",
    "ReshapeFusion",
    "FreeDimensionOverrideTransformer",
    "SliceConcatToSpaceToDepthFusion",
    "GeluFusionL1",
    "LayerNormFusionL1",
    "EnsureUniqueDQForNodeUnit",
    "WhereDummyDq",
    "TransposeOptimizer",
    "TransposeOptimizer_CPUExecutionProvider",
    "DynamicQuantizeMatMulFusion",
    "GeluFusionL2",
    "LayerNormFusionL2",
    "SimplifiedLayerNormFusion",
    "AttentionFusion",
    "EmbedLayerNormFusion",
    "GatherSliceToSplitFusion",
    "GatherToSliceFusion",
    "MatmulTransposeFusion",
    "BiasGeluFusion",
    "GroupQueryAttentionFusion",
    "SkipLayerNormFusion",
    "BiasSkipLayerNormFusion",
    "FastGeluFusion",
    "QuickGeluFusion",
    "BiasSoftmaxFusion",
    "BiasDropoutFusion",
    "MatMulScaleFusion",
    "MatMulActivationFusion",
    "SwiGluFusion",
    "ConvAddActivationFusion",
    "NchwcTransformer",
    "NhwcTransformer",
)
"""The graph transformers ORT 1.32's CPU sessions apply (as its verbose log names them): the
candidates a diagnosis disables, those that fuse or drop nodes first (the search prefers the
first of several that each cure alone). A name ORT does not know is ignored."""

QUANTIZATION_SHARE = 0.5
NORM_SHARE = 1e-4


def worse_than_reference(deployed_sq: float, quantization_sq: float, reference_sq: float) -> bool:
    """Whether a runtime's outputs are further from the float model's than the reference's are,
    by more than float noise.

    ``deployed_sq``: squared L2 distance between the runtime's outputs and the float model's;
    ``quantization_sq``: between the reference's and the float model's (the graph's own
    quantization error); ``reference_sq``: the reference outputs' squared norm. The runtime is
    at fault where its error passes the reference's by more than half of it plus 1e-4 of the
    output norm. A runtime computing the graph's math in another way (accumulation order, int32
    bias rounding, fused requantization that rounds a tie the other way, the s8 -> u8 shift)
    lands other values but no further from the float model: its rounding is independent of the
    quantization error, so the two add in quadrature, within the margin. A runtime computing
    other math (a dropped op, a scale applied to the wrong elements, a tensor quantized that
    the graph keeps in float) adds an error of its own on top: beyond the margin the report's
    error no longer describes the graph. The norm term covers float32 rounding where the
    quantization error is itself tiny.
    """
    margin = (1 + QUANTIZATION_SHARE) * math.sqrt(quantization_sq)
    margin += NORM_SHARE * math.sqrt(reference_sq)
    return math.sqrt(deployed_sq) > margin


class ModelSessions:
    """ORT sessions over one model at chosen optimization levels: its graph serialized once,
    its stored weights given to each session as external initializers; a context manager that
    removes the temporary folder of the optimized graphs."""

    def __init__(self, model: onnx.ModelProto, providers: Sequence[str]):
        self.providers = list(providers)
        self._dir = tempfile.TemporaryDirectory(prefix="qcal-validate-")
        self._large = over_protobuf_limit(model)
        self._model = model.SerializeToString()
        self._proto = model
        self._weights = session_initializers(model)

    def __enter__(self) -> ModelSessions:
        return self

    def __exit__(self, *exc: object) -> None:
        self._dir.cleanup()

    def open(
        self,
        level: Level | None = None,
        disabled: Sequence[str] = (),
        optimized: Path | None = None,
    ) -> ort.InferenceSession:
        """A session at ``level`` (None: ORT's default) without the ``disabled`` optimizers,
        writing its optimized graph to ``optimized``; ORT's errors propagate."""
        options = ort.SessionOptions()
        options.log_severity_level = 4  # failures are reported, not logged by ORT
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if level is not None:
            options.graph_optimization_level = level
        if optimized is not None:
            options.optimized_model_filepath = str(optimized)
        names, values = self._weights
        if names:
            options.add_external_initializers(names, values)
        with paging_out(self._proto):
            return ort.InferenceSession(
                self._model, options, providers=self.providers, disabled_optimizers=list(disabled)
            )

    def scratch(self, name: str) -> Path | None:
        """A path in the temporary folder for an optimized graph; None past 2 GB (not read)."""
        return None if self._large else Path(self._dir.name) / name


@dataclass
class RuntimeIssue:
    """ORT at its default level fails to run the model (``kind`` "fails", ORT's ``error``) or
    computes outputs further from the float model's than the reference's (``kind``
    "disagrees"); where found, the first ``level`` that shows it, the ``optimizer`` whose
    removal alone cures it and the nodes that optimizer rewrote (``changes``)."""

    kind: str
    runtime: str
    detail: str
    error: str | None = None
    level: str | None = None
    optimizer: str | None = None
    changes: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        """One line: what ORT does, that the runtime and not the scales is at fault, and where."""
        what = (
            f"cannot run the quantized model ({self.error})"
            if self.kind == "fails"
            else f"computes the quantized model unlike its graph ({self.detail})"
        )
        return (
            f"{self.runtime} at its default graph optimizations {what}; with optimizations off "
            f"it runs the graph as written: the runtime, not the scales, is at fault "
            f"({self.culprit}; see the report's validation section)"
        )

    @property
    def summary(self) -> str:
        """Short: what ORT does to the model at its default level, and the optimizer at fault."""
        what = "fails to run" if self.kind == "fails" else "miscomputes"
        return (
            f"{self.runtime} at its default graph optimizations {what} the quantized model "
            f"({self.culprit})"
        )

    @property
    def culprit(self) -> str:
        if self.level is None:
            return "not reproduced on the first batch alone"
        if self.optimizer is None:
            return f"from level '{self.level}' on, no single ORT optimizer"
        changes = "; ".join(self.changes[:3]) + ("; ..." if len(self.changes) > 3 else "")
        return f"ORT's {self.optimizer} from level '{self.level}'" + (
            f": {changes}" if changes else ""
        )

    def to_report(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "error": self.error,
            "level": self.level,
            "optimizer": self.optimizer,
            "changes": self.changes,
        }


def one_line(error: Exception, limit: int = 240) -> str:
    """ORT's message on one line without its status prefix, cut to ``limit`` characters."""
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", " ".join(str(error).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


Outputs = list[np.ndarray]


def diagnose(
    sessions: ModelSessions,
    feed: dict[str, np.ndarray],
    names: list[str],
    float_outputs: Outputs,
    reference_outputs: Outputs,
    issue: RuntimeIssue,
) -> None:
    """Fill ``issue``'s level, optimizer and changes from trial sessions on one batch: the
    first level that fails or disagrees, then halves of ``OPTIMIZERS`` disabled at it."""

    def cured(level: Level, disabled: Sequence[str] = ()) -> bool:
        try:
            outputs = sessions.open(level, disabled).run(names, feed)
        except ORT_ERRORS:
            return False
        return not any(
            worse_than_reference(_sq(out - flt), _sq(ref - flt), _sq(ref))
            for flt, ref, out in zip(float_outputs, reference_outputs, outputs, strict=True)
        )

    found = next(((name, level) for name, level in LEVELS if not cured(level)), None)
    if found is None:
        return
    issue.level, level = found
    optimizer = _single_culprit(lambda disabled: cured(level, disabled), list(OPTIMIZERS))
    if optimizer is not None:
        issue.optimizer = optimizer
        issue.changes = _changes(sessions, level, optimizer)


def _single_culprit(cures: Callable[[list[str]], bool], names: list[str]) -> str | None:
    """The one optimizer of ``names`` whose removal cures, by halving; None where removing
    all of them does not cure, or only removing several together does."""
    if not cures(names):
        return None
    while len(names) > 1:
        half = len(names) // 2
        if cures(names[:half]):
            names = names[:half]
        elif cures(names[half:]):
            names = names[half:]
        else:
            return None
    return names[0]


def _changes(sessions: ModelSessions, level: Level, optimizer: str) -> list[str]:
    """The nodes (not Q/DQ) that ``optimizer`` fuses into another op type or removes, by node
    name: with it alone against no optimizer at ``level``; where that shows nothing (it needs
    others' rewrites first), with all against all but it."""
    others = [name for name in OPTIMIZERS if name != optimizer]
    for off_before, off_after in ((OPTIMIZERS, others), ([optimizer], [])):
        before = _optimized(sessions, level, off_before, "before.onnx")
        after = _optimized(sessions, level, off_after, "after.onnx")
        if before is None or after is None:
            return []
        changes = _renamed(before, after)
        if changes:
            return changes
    return []


def _optimized(
    sessions: ModelSessions, level: Level, disabled: Sequence[str], name: str
) -> list[onnx.NodeProto] | None:
    """The nodes of ORT's optimized graph at ``level`` without ``disabled``; None where it
    cannot be written (past 2 GB, or ORT failed before writing it)."""
    path = sessions.scratch(name)
    if path is None:
        return None
    path.unlink(missing_ok=True)
    with contextlib.suppress(ORT_ERRORS):  # a session that fails to run has written its graph
        sessions.open(level, disabled, optimized=path)
    if not path.is_file():
        return None
    return list(onnx.load(str(path), load_external_data=False).graph.node)


def _renamed(before: list[onnx.NodeProto], after: list[onnx.NodeProto]) -> list[str]:
    """Nodes of ``before`` (not Q/DQ) that ``after`` lacks or runs as another op type."""
    types = {node.name: node.op_type for node in after}
    changes = []
    for node in before:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        fused = types.get(node.name)
        if fused is None:
            changes.append(f"{node.op_type} {node.name!r} removed")
        elif fused != node.op_type:
            changes.append(f"{node.op_type} {node.name!r} -> {fused}")
    return changes


def _sq(values: np.ndarray) -> float:
    flat = values.astype(np.float64).ravel()
    return float(flat @ flat)
