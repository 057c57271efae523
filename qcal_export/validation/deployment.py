"""What the quantized model buys where it is deployed: which kernels ONNX Runtime runs for it
(its profiler's op names: QLinearConv, QLinearAdd, MatMulIntegerToFloat, ...), its latency
against the float model's on the same batch, and both file sizes."""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from qcal_export.capture.onnxruntime import stored_session
from qcal_export.onnx_io.weight_views import stored_bytes
from qcal_export.onnx_io.weights import file_model

log = logging.getLogger(__name__)

INTEGER_KERNELS = ("QLinear", "MatMulInteger", "ConvInteger", "QGemm", "QAttention", "Nhwc")
"""Prefixes of the op names of ORT's integer kernels, as its profiler names the nodes it runs
(``NhwcMaxPool`` is the 8-bit MaxPool the QDQ fusions leave on the CPU)."""


def profile_kernels(
    model: str | Path | onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    providers: Sequence[str],
) -> Counter[str]:
    """How many nodes of each op type ORT runs for ``model`` at its default optimizations, by
    its profiler on one run of ``feed``: the kernels after ORT's fusions, not the graph's ops."""
    with tempfile.TemporaryDirectory(prefix="qcal-profile-") as folder:
        options = _options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = _session(model, options, providers)
        session.run(None, dict(feed))
        events = json.loads(Path(session.end_profiling()).read_text())
    return Counter(
        event["args"]["op_name"]
        for event in events
        if event.get("cat") == "Node"
        and event.get("name", "").endswith("_kernel_time")
        and "op_name" in event.get("args", {})
    )


def integer_kernels(kernels: Mapping[str, int]) -> dict[str, int]:
    """The integer kernels among ``kernels`` (``INTEGER_KERNELS``), with their counts."""
    return {op: n for op, n in sorted(kernels.items()) if op.startswith(INTEGER_KERNELS)}


def median_latency(
    model: str | Path | onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    providers: Sequence[str],
    runs: int = 5,
) -> float:
    """Median seconds of ``runs`` runs of ``feed`` at ORT's default optimizations, after one
    warm-up run."""
    session = _session(model, _options(), providers)
    session.run(None, dict(feed))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, dict(feed))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_deployment(
    float_path: Path,
    quantized: onnx.ModelProto,
    quantized_path: Path | None,
    feed: Mapping[str, np.ndarray],
    providers: Sequence[str],
    runs: int = 5,
) -> dict[str, Any]:
    """The report's ``deployment`` section: the quantized model's kernels, and latency (median
    of ``runs``, same ``feed``, default optimizations) and file size, float against quantized.

    The quantized model is read from ``quantized_path`` where it was written (its size then
    counts its external data), else opened from its proto and weight store.
    """
    section: dict[str, Any] = {
        "providers": list(providers),
        "batch": {name: list(np.shape(value)) for name, value in feed.items()},
        "runs": runs,
        "float": _side(float_path, feed, providers, runs, _file_bytes(float_path)),
    }
    if quantized_path is not None:
        source: str | Path | onnx.ModelProto = quantized_path
        size = _file_bytes(quantized_path)
    else:
        source = quantized
        size = quantized.ByteSize() + stored_bytes(quantized)
    section["quantized"] = _side(source, feed, providers, runs, size)
    kernels = profile_kernels(source, feed, providers)
    section["kernels"] = dict(sorted(kernels.items()))
    section["integer_kernels"] = integer_kernels(kernels)
    if not section["integer_kernels"]:
        section["note"] = no_integer_kernels(providers)
    log.info(
        "deployment: %.3g ms float, %.3g ms quantized (median of %d), integer kernels %s",
        section["float"]["latency_ms"],
        section["quantized"]["latency_ms"],
        runs,
        section["integer_kernels"] or "none",
    )
    return section


def no_integer_kernels(providers: Sequence[str]) -> str:
    """Why ORT ran no integer kernel for the quantized model, for the report's note."""
    if providers and providers[0] == "CUDAExecutionProvider":
        return (
            "ONNX Runtime's CUDA EP fuses no integer kernels from Q/DQ: it runs every "
            "QuantizeLinear/DequantizeLinear beside the float op, so the quantized model is not "
            "faster there; on NVIDIA GPUs the Q/DQ model is deployed through TensorRT (its EP or "
            "trtexec), which builds int8/fp8 kernels from it"
        )
    return (
        "ONNX Runtime fused no integer kernels for this placement: on the CPU, --target ort with "
        "--activation-format uint8 places Q/DQ where its QDQ fusions apply (its integer kernels "
        "take 8-bit activations: 16-bit ones run as float ops between their Q/DQ)"
    )


def _side(
    model: str | Path | onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    providers: Sequence[str],
    runs: int,
    size: int,
) -> dict[str, float]:
    return {
        "latency_ms": median_latency(model, feed, providers, runs) * 1e3,
        "file_bytes": size,
    }


def _file_bytes(path: Path) -> int:
    """The model file's size plus its external data files'."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in locations)


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return options


def _session(
    model: str | Path | onnx.ModelProto, options: ort.SessionOptions, providers: Sequence[str]
) -> ort.InferenceSession:
    light = model if isinstance(model, onnx.ModelProto) else file_model(Path(model))
    if light is not None:
        return stored_session(light, options, providers)
    return ort.InferenceSession(str(model), options, providers=list(providers))
