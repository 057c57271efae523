"""The table of ``bench_capture_throughput.py``: rows, ratios against ORT, and the notes."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
from typing import Any

import harness


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    return f"{a[key] / b[key]:.2f}" if a and b and b[key] else "n/a"


def _hardware(provider: str) -> str:
    cpu = f"{os.cpu_count()} logical cores ({platform.machine()})"
    if provider != "cuda":
        return f"CPU: {cpu}, no GPU used"
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA in torch"
    except Exception as e:  # the table still says what ran
        gpu = f"unknown ({e})"
    return f"GPU: {gpu}; CPU: {cpu}"


def render(
    rows: list[dict[str, Any]], args: argparse.Namespace, total_s: float, peers: dict[str, str]
) -> str:
    """The table; ``peers`` names, for each of our rows, ORT's row of the same method."""
    ok = {r["method"]: r for r in rows if "error" not in r}
    first = next(iter(ok.values()), {})
    versions = harness.versions()
    busy = max(args.load_before, args.load_after) > (os.cpu_count() or 1)
    lines = [
        f"# Calibration throughput, {args.provider.upper()} EP: qcal_export vs quantize_static",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- {_hardware(args.provider)}; provider {args.provider}, device_id {args.device_id}",
        "- model: all-MiniLM-L6-v2 (demo ONNX export), MatMul/Gemm quantized by both, int8",
        f"- data: {first.get('samples', '?')} samples ({args.num_calib} demo texts"
        + (f" x {args.repeat_data}" if args.repeat_data > 1 else "")
        + f") in {first.get('batches', '?')} batches of {args.batch_size}, every batch padded "
        f"to {first.get('seq_len', '?')} tokens (the longest text)",
        f"- times: median of {args.repeats} calls per row after one warm-up call; "
        f"benchmark wall time {total_s:.0f} s; 1-min load average {args.load_before:.1f} "
        f"before, {args.load_after:.1f} after"
        + (" (above the core count: other work shared the CPU)" if busy else ""),
        "",
        "| row | calibrators on | calib s | calib samples/s | whole s | whole samples/s "
        "| calib vs ORT same method | whole vs ORT same method | calib vs ORT MinMax "
        "| peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    minmax = ok.get("ort-minmax")
    for row in rows:
        name = row["method"]
        if "error" in row:
            lines.append(f"| {name} | failed | | | | | | | | |")
            continue
        same = ok.get(peers.get(name, ""))
        lines.append(
            f"| {name} | {row['device']} | {row['calib_s']:.2f} | {row['calib_sps']:.0f} "
            f"| {row['whole_s']:.2f} | {row['whole_sps']:.0f} "
            f"| {_ratio(row, same, 'calib_sps') if same else ''} "
            f"| {_ratio(row, same, 'whole_sps') if same else ''} "
            f"| {_ratio(row, minmax, 'calib_sps') if name != 'ort-minmax' else '1.00'} "
            f"| {row['peak_mib']:.0f} |"
        )
    lines += [
        "",
        "Ratios are samples/s of the row over samples/s of the ORT row (> 1: the row is faster).",
        "",
        "Notes:",
        "- calib: ours `CalibrationResult.timings['calibrate_s']` (capture session, every pass "
        "over the data, activation and weight calibrators); ORT from `create_calibrator` "
        "(graph augmentation, session) to the end of `compute_data`, timed inside the same "
        "`quantize_static` call. whole: the call that writes the QDQ model "
        "(ours with `validate_batches=0`).",
        "- Ours: `calibrate_onnx(format='int8', method=..., weight_method='max', "
        "per_channel_weights=True)` at our method defaults (percentile 99.999 of 2048 bins, "
        "entropy 2048 bins / 128 quantized bins); mse takes a max pass first (two passes over "
        "the data), the others one pass.",
        "- ORT: `quantize_static(QDQ, QInt8/QInt8, per_channel=True, "
        "op_types_to_quantize=['MatMul', 'Gemm'], calibration_providers=[provider], "
        "ActivationSymmetric=True, OpTypesToExcludeOutputQuantization=['MatMul', 'Gemm'])`, "
        "default calibrator options (Percentile 99.999 / 2048 bins, Entropy 128 bins). ORT's "
        "calibrator captures the inputs and outputs of every MatMul/Gemm, ours only the inputs "
        "it quantizes; ORT's histogram calibrators keep every batch's outputs in host memory "
        "until `compute_data` (hence their peak RSS).",
        "- calibrators on: where ours hands captured tensors to its calibrators (`cuda:N`: "
        "IOBinding outputs bound to the GPU, passed to torch by DLPack, no host copy); for ORT, "
        "the provider its calibration session runs on (its outputs come back as numpy).",
        "- `*-hostcopy` rows: ours with `OrtCapture(iobinding=False)`, the captured tensors "
        "fetched to the host as numpy (as before device-resident capture).",
    ]
    return "\n".join(lines + harness.failures(rows)) + "\n"
