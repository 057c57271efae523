"""The rows of bench_llm_gpu.py and how one runs in its (fresh) process: ours
(``calibrate_onnx``) or ONNX Runtime's ``quantize_static`` on the LLM benchmark model, over the
same seeded token batches, with per-phase timers on our rows. Imported as a sibling module.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import llm_model
import ort_static_rows
import phase_timers


@dataclass(frozen=True)
class Row:
    """One measured configuration: whose call, which format and method, on which data
    (``full``: every sequence; ``hist``: the first ``--hist-sequences``, what ORT's histogram
    calibrators can hold in host memory), writing serving checkpoints or not."""

    who: str
    format: str
    method: str
    data: str = "full"
    hessian: bool = False
    checkpoint: bool = False


# In the order a time-limited call runs them: the headline pair first; NVFP4 last, its
# Hessian-weighted sweep of every weight being the longest row.
ROWS: dict[str, Row] = {
    "ours-max": Row("ours", "int8", "max"),
    "ort-minmax": Row("ort", "int8", "MinMax"),
    "ours-fp8": Row("ours", "fp8", "max", checkpoint=True),
    "ours-percentile": Row("ours", "int8", "percentile", "hist"),
    "ort-percentile": Row("ort", "int8", "Percentile", "hist"),
    "ours-entropy": Row("ours", "int8", "entropy", "hist"),
    "ort-entropy": Row("ort", "int8", "Entropy", "hist"),
    "ours-mse": Row("ours", "int8", "mse", "hist"),
    "ours-nvfp4": Row("ours", "nvfp4", "nvfp4-mse", hessian=True, checkpoint=True),
}
PAIRS = (
    ("ours-max", "ort-minmax"),
    ("ours-mse", "ort-percentile"),
    ("ours-mse", "ort-entropy"),
    ("ours-percentile", "ort-percentile"),
    ("ours-entropy", "ort-entropy"),
)
"""(ours, ORT) pairs of the ratio table: the same data on both sides."""
PROFILE_ROW = "ours-max-profile"
CHECKPOINT_LAYOUTS = {"nvfp4": ("modelopt", "compressed-tensors"), "fp8": ("compressed-tensors",)}
"""The serving layouts each format's row writes: ModelOpt's FP8 layout takes per-tensor weight
scales only, and the fp8 row calibrates per channel."""


def batches(size: str, sequences: int, batch: int, seq: int) -> list[dict[str, Any]]:
    """``sequences`` seeded token sequences of ``seq`` tokens in batches of ``batch`` (the last
    one smaller if it does not divide); every other batch's last row half padding."""
    full, rest = divmod(sequences, batch)
    data = llm_model.calibration_batches(size, count=full, batch=batch, seq=seq)
    if rest:
        data += llm_model.calibration_batches(size, count=1, batch=rest, seq=seq, seed=full)
    return data


def ort_histogram_bytes_per_sequence(size: str, seq: int, dtype: str) -> int:
    """Host bytes ORT's Percentile/Entropy calibrators hold per calibration sequence: every
    input and output of every MatMul (attention's included) and the logits, kept for all
    batches until the histograms are built.

    Per token and decoder layer: 10 tensors of ``hidden``, 2 of the key/value width, 3 of the
    MLP width and the attention scores and probabilities (``heads x seq`` each); then the LM
    head's input and logits (ORT fetches every output of its augmented session).
    """
    c = llm_model.SIZES[size]
    h, i, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    kv = h // heads * c["num_key_value_heads"]
    per_layer = 10 * h + 2 * kv + 3 * i + 2 * heads * seq
    per_token = c["num_hidden_layers"] * per_layer + h + c["vocab_size"]
    return per_token * seq * (2 if dtype == "float16" else 4)


# --------------------------------------------------------------------------------------------
# One row, in this (fresh) process
# --------------------------------------------------------------------------------------------


def _ours(name: str, args: Any, data: list[dict], out: Path) -> dict[str, Any]:
    """One calibrate_onnx call under the phase timers; its timings and what it wrote."""
    import qcal_export.pipeline.calibrate as pipeline

    row = ROWS["ours-max" if name == PROFILE_ROW else name]
    timers = phase_timers.PhaseTimers(profile=name == PROFILE_ROW, sync=_cuda_sync(args))
    phase_timers.install(timers)
    options: dict[str, Any] = dict(format=row.format, method=row.method)
    if row.format == "int8":
        options.update(weight_method="max", per_channel_weights=True)
    if row.hessian:
        options["hessian"] = True
    if row.checkpoint:
        options.update(
            checkpoint=out / "checkpoint", checkpoint_layouts=CHECKPOINT_LAYOUTS[row.format]
        )
    call = lambda: pipeline.calibrate_onnx(  # noqa: E731
        args.model,
        data,
        output=out / "q.onnx",
        provider=args.provider,
        device_id=args.device_id,
        validate_batches=0,  # quantize_static does not re-run the model either
        **options,
    )
    start = time.perf_counter()
    if name == PROFILE_ROW:
        result = _profiled(call, Path(args.profile_table), args.provider)
    else:
        result = call()
    seconds = time.perf_counter() - start
    return {
        "call_s": seconds,
        "phases": timers.table(seconds),
        "phases_missing": timers.missing,
        "library_timings": dict(result.timings),
        "checkpoints": {
            k: str(Path(v).relative_to(out)) for k, v in result.checkpoint_paths.items()
        },
        "torch_peak_cuda_mib": _torch_peak_cuda(),
    }


def _cuda_sync(args: Any) -> Any:
    """On CUDA rows, torch.cuda.synchronize once torch has a CUDA context (never creating one),
    so that each phase owns the GPU work it queued."""
    import torch

    if args.provider != "cuda" or not torch.cuda.is_available():
        return None

    def sync() -> None:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()

    return sync


def _torch_peak_cuda() -> float | None:
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def _profiled(call: Any, table: Path, provider: str) -> Any:
    """``call()`` under torch.profiler (CPU, and CUDA on a CUDA row); its key_averages table
    (by total time) written to ``table``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if provider == "cuda" and torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        result = call()
    sort = "cuda_time_total" if ProfilerActivity.CUDA in activities else "cpu_time_total"
    table.write_text(prof.key_averages().table(sort_by=sort, row_limit=60) + "\n")
    return result


def _ort(name: str, args: Any, data: list[dict], out: Path) -> dict[str, Any]:
    """One quantize_static call (QDQ, int8 per-channel weights, MatMul/Gemm, external data),
    with uint8 asymmetric activations: what ours gives under its default ort target."""
    from qcal_export.capture.iobinding import bind_device_id
    from qcal_export.capture.onnxruntime import select_providers

    providers = bind_device_id(select_providers(args.provider), args.device_id)
    start = time.perf_counter()
    ort_static_rows.calibrate_ort(
        Path(args.model),
        data,
        ROWS[name].method,
        out / "q.onnx",
        preprocess=False,
        symmetric=False,
        quantize_outputs=False,
        providers=providers,
        external_data=True,
        activation_type="QUInt8",
    )
    return {"call_s": time.perf_counter() - start, "providers": [str(p) for p in providers]}


def run_row(args: Any) -> dict[str, Any]:
    """Measure row ``args.row`` in this process; its JSON-able result (files written, sizes)."""
    import onnxruntime.quantization  # noqa: F401  (imported before the clock starts)
    import torch  # noqa: F401

    import qcal_export.pipeline.calibrate

    name = args.row
    row = ROWS["ours-max" if name == PROFILE_ROW else name]
    sequences = args.hist_sequences if row.data == "hist" else args.sequences
    data = batches(args.size, sequences, args.batch, args.seq)
    out = Path(args.work_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    measured = (_ours if row.who == "ours" else _ort)(name, args, data, out)
    files = {
        str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()
    }
    return {
        "row": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "who": row.who,
        "format": row.format,
        "method": row.method,
        "sequences": sequences,
        "batches": len(data),
        "samples_per_s": sequences / measured["call_s"],
        "child_peak_rss_mib": harness.peak_rss_mib(),
        "files": files,
        "qcal_export": str(Path(qcal_export.pipeline.calibrate.__file__).parents[1]),
        **measured,
    }


def write_row(args: Any) -> None:
    """The child's entry: measure the row and write its JSON to ``args.json``."""
    Path(args.json).write_text(json.dumps(run_row(args), indent=1))
