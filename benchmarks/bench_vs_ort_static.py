"""Ours vs ONNX Runtime's quantize_static on the demo model: time, peak memory, accuracy.

Calibrates all-MiniLM-L6-v2 (the demo ONNX export) on the demo calibration texts with
``calibrate_onnx`` (int8, activation method max and mse, per-channel int8 weights) and with
``onnxruntime.quantization.quantize_static`` (QDQ, QInt8 activations and weights, per channel,
MinMax / Percentile / Entropy), both over MatMul and Gemm only, then scores each QDQ model by the
cosine of its sentence embeddings against the float model's on the held-out texts.

Every row runs in its own fresh process (this script with ``--row``), so the peak RSS
(``ru_maxrss``) belongs to that row alone. Not a test; run it by hand:

    python benchmarks/bench_vs_ort_static.py [--num-calib 256] [--batch-size 16]
        [--methods ours-max ours-mse ort-minmax ort-percentile ort-entropy]

The table is printed and written to ``benchmarks/results/vs_ort_static.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import ort_static_rows

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_FILE = RESULTS_DIR / "vs_ort_static.md"
NUM_HELDOUT = 128
OURS = {"ours-max": "max", "ours-mse": "mse"}
ORT = {"ort-minmax": "MinMax", "ort-percentile": "Percentile", "ort-entropy": "Entropy"}
METHODS = (*OURS, *ORT)
FIXED_SHAPE_ONLY = {"ort-percentile", "ort-entropy"}
# Like-for-like pairs for the ratio table: (ours, ORT).
PAIRS = (
    ("ours-max", "ort-minmax"),
    ("ours-mse", "ort-minmax"),
    ("ours-mse", "ort-percentile"),
    ("ours-mse", "ort-entropy"),
)


def current_rss_mib() -> float:
    """Current resident set size, MiB (``VmRSS`` from /proc; 0 where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# --------------------------------------------------------------------------------------------
# One row, in a fresh process
# --------------------------------------------------------------------------------------------


def _calibrate_ours(model: Path, batches: list[dict], method: str, output: Path) -> None:
    from qcal_export import calibrate_onnx

    # validate_batches=0: quantize_static does not re-run the model, so neither do we here.
    calibrate_onnx(
        model,
        batches,
        output=output,
        format="int8",
        method=method,
        weight_method="max",
        per_channel_weights=True,
        validate_batches=0,
    )


def run_row(args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate with one method in this process; time, peak RSS and held-out cosine."""
    import logging

    import numpy as np  # noqa: F401  (imported before the baseline, like the libraries below)
    import onnx
    import onnxruntime.quantization  # noqa: F401
    import torch  # noqa: F401

    import qcal_export  # noqa: F401
    from qcal_export.demo import demo_batches, demo_model_path, demo_texts, embedding_cosine

    logging.basicConfig(level=logging.ERROR)
    float_model = demo_model_path()
    calib_texts, heldout_texts = demo_texts(args.num_calib, NUM_HELDOUT)
    calib = demo_batches(calib_texts, batch_size=args.batch_size)
    heldout = demo_batches(heldout_texts, batch_size=args.batch_size)
    # ORT's histogram calibrators stack every batch's outputs with np.asarray, so they fail on
    # batches of different sequence lengths (onnxruntime#18792): pad those to one length.
    padded = args.pad_to_longest or args.row in FIXED_SHAPE_ONLY
    longest = max(b["input_ids"].shape[1] for b in calib)
    if padded:
        calib = ort_static_rows.pad_to(calib, longest)
    baseline = harness.peak_rss_mib()
    output = Path(args.work_dir) / f"{args.row}.onnx"
    start = time.perf_counter()
    if args.row in OURS:
        _calibrate_ours(float_model, calib, OURS[args.row], output)
    else:
        ort_static_rows.calibrate_ort(
            float_model,
            calib,
            ORT[args.row],
            output,
            preprocess=args.ort_preprocess,
            symmetric=not args.ort_asymmetric,
            quantize_outputs=args.ort_quantize_outputs,
        )
    seconds = time.perf_counter() - start
    peak = harness.peak_rss_mib()
    score = embedding_cosine(float_model, output, heldout)
    quantized = onnx.load(str(output), load_external_data=False)
    q_nodes = sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    return {
        "method": args.row,
        "seconds": seconds,
        "baseline_mib": baseline,
        "peak_mib": peak,
        "increase_mib": peak - baseline,
        "cos_mean": score["mean"],
        "cos_min": score["min"],
        "count": score["count"],
        "q_nodes": q_nodes,
        "calib_batches": len(calib),
        "calib_tokens_max": longest,
        "padding": f"fixed {longest}" if padded else "per batch",
    }


def spawn_row(method: str, args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Run this script with ``--row method`` in a fresh interpreter; its JSON result."""
    argv = ["--row", method, "--num-calib", str(args.num_calib)]
    argv += ["--batch-size", str(args.batch_size), "--work-dir", str(work_dir)]
    argv += ["--ort-preprocess"] if args.ort_preprocess else []
    argv += ["--pad-to-longest"] if args.pad_to_longest else []
    argv += ["--ort-asymmetric"] if args.ort_asymmetric else []
    argv += ["--ort-quantize-outputs"] if args.ort_quantize_outputs else []
    return harness.spawn_row(__file__, argv, work_dir / f"{method}.json", {"method": method})


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def render(rows: list[dict[str, Any]], args: argparse.Namespace, total_s: float) -> str:
    """The markdown report: header, main table, ours-vs-ORT ratio table, notes."""
    ok = {r["method"]: r for r in rows if "error" not in r}
    reference = ok.get("ort-minmax")
    versions = harness.versions()
    lines = [
        "# qcal_export vs onnxruntime.quantization.quantize_static",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- CPU: {os.cpu_count()} logical cores ({platform.machine()}), no GPU used",
        "- model: all-MiniLM-L6-v2 (demo ONNX export, opset 17), MatMul/Gemm quantized by both",
        f"- calibration: {args.num_calib} demo texts in batches of {args.batch_size} "
        f"(padding: see the column and notes); held-out: {NUM_HELDOUT} texts",
        f"- total benchmark wall time: {total_s:.0f} s; 1-min load average "
        f"{args.load_before:.1f} before, {args.load_after:.1f} after"
        + (
            " (above the core count: other processes shared the CPU, times are inflated)"
            if max(args.load_before, args.load_after) > (os.cpu_count() or 1)
            else ""
        ),
        "",
        "| method | calib padding | wall time (s) | baseline RSS (MiB) | peak RSS (MiB) "
        "| increase (MiB) | cos mean | cos min | Q nodes | time / ORT MinMax "
        "| peak RSS / ORT MinMax |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | | failed | | | | | | | | |")
            continue
        time_ratio = _ratio(row["seconds"], reference["seconds"]) if reference else "n/a"
        mem_ratio = _ratio(row["peak_mib"], reference["peak_mib"]) if reference else "n/a"
        lines.append(
            f"| {row['method']} | {row['padding']} | {row['seconds']:.1f} "
            f"| {row['baseline_mib']:.0f} "
            f"| {row['peak_mib']:.0f} | {row['increase_mib']:.0f} | {row['cos_mean']:.5f} "
            f"| {row['cos_min']:.5f} | {row['q_nodes']} | {time_ratio} | {mem_ratio} |"
        )
    pairs = [(a, b) for a, b in PAIRS if a in ok and b in ok]
    if pairs:
        lines += [
            "",
            "Ours vs ORT (ratio < 1: ours is faster / smaller):",
            "",
            "| ours | ORT | time ratio | peak RSS ratio | RSS increase ratio |",
            "|---|---|---:|---:|---:|",
        ]
        for ours, theirs in pairs:
            a, b = ok[ours], ok[theirs]
            lines.append(
                f"| {ours} | {theirs} | {_ratio(a['seconds'], b['seconds'])} "
                f"| {_ratio(a['peak_mib'], b['peak_mib'])} "
                f"| {_ratio(a['increase_mib'], b['increase_mib'])} |"
            )
    preprocess = (
        "ORT rows ran `quant_pre_process` first"
        if args.ort_preprocess
        else "ORT rows ran on the model as exported, without `quant_pre_process`"
    )
    act = "asymmetric (ORT default)" if args.ort_asymmetric else "symmetric (like ours)"
    lines += [
        "",
        "Notes:",
        "- Each row is a fresh process. Baseline RSS: after imports, model export cache and "
        "tokenized batches, before calibrating; peak RSS (`ru_maxrss`) is taken right after the "
        "calibration call, before scoring; increase = peak - baseline.",
        "- Wall time covers the whole call that writes the QDQ model (plan/augment, capture, "
        "calibrate, export, save). Ours runs with `validate_batches=0`, as quantize_static does "
        "not re-run the model.",
        "- Ours: `calibrate_onnx(format='int8', method=max|mse, weight_method='max', "
        "per_channel_weights=True)` at the default `ort` placement: uint8 asymmetric "
        "activations per tensor, and besides the MatMuls' inputs the tensors ORT's integer "
        "kernels read (bias Adds, embedding Gathers: the Q nodes column), residual stream left "
        "float.",
        "- ORT: `quantize_static(QuantFormat.QDQ, QInt8/QInt8, per_channel=True, "
        f"op_types_to_quantize=['MatMul', 'Gemm'])`, activations {act}, "
        "default calibrator options (Percentile 99.999, Entropy 128 bins); "
        f"{preprocess}; "
        + (
            "MatMul/Gemm outputs quantized too (ORT's QDQ default)."
            if args.ort_quantize_outputs
            else "`OpTypesToExcludeOutputQuantization=['MatMul', 'Gemm']`, so ORT quantizes "
            "the MatMul inputs alone (Q nodes column)."
        ),
        "- On a tensor both quantize, ORT MinMax and ours max give the same range; ORT routes "
        "every consumer of a quantized tensor through its DequantizeLinear (the residual Add "
        "and Shape nodes too), ours only the consumers its placement quantizes.",
        "- calib padding: `demo_batches` pads each batch to its own longest text (per batch). "
        "ORT's Percentile and Entropy calibrators stack all batches' outputs with `np.asarray` "
        "and raise `ValueError: ... inhomogeneous shape` on batches of different sequence "
        "lengths (onnxruntime PR #32514, open, related issue #18792), so their batches are padded "
        "to the longest calibration text (fixed); the padded positions' activations then enter "
        "their histograms. `--pad-to-longest` pads every row the same way.",
        "- ORT Entropy at quantize_static's defaults (128 histogram bins, 128 quantized bins) "
        "has a single candidate threshold, the full range, so it gives MinMax's scales "
        "(checked: every activation scale equal); quantize_static passes no bin count through "
        "`extra_options`.",
        "- cos: per-sentence cosine of the quantized model's sentence embedding vs the float "
        "model's, on the held-out texts (`qcal_export.demo.embedding_cosine`), CPU EP.",
    ]
    return "\n".join(lines + harness.failures(rows)) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-calib", type=int, default=256, help="calibration texts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="rows to run"
    )
    parser.add_argument(
        "--ort-preprocess",
        action="store_true",
        help="run onnxruntime's quant_pre_process before quantize_static",
    )
    parser.add_argument(
        "--ort-asymmetric",
        action="store_true",
        help="ORT activations asymmetric (its default) instead of symmetric like ours",
    )
    parser.add_argument(
        "--ort-quantize-outputs",
        action="store_true",
        help="let ORT also quantize MatMul/Gemm outputs (its QDQ default; ours does not)",
    )
    parser.add_argument(
        "--pad-to-longest",
        action="store_true",
        help="pad every row's calibration batches to the longest (default: only the ORT "
        "Percentile/Entropy rows, which fail on batches of different lengths)",
    )
    parser.add_argument("--output", type=Path, default=RESULT_FILE, help="markdown result file")
    # Internal: one row in this process.
    parser.add_argument("--row", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.row:
        Path(args.json).write_text(json.dumps(run_row(args)))
        return 0
    from rich.console import Console

    console = Console(highlight=False)
    args.load_before = os.getloadavg()[0]
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qcal-bench-") as tmp:
        for method in args.methods:
            console.print(f"[bold]{method}[/] ...", end=" ")
            row = spawn_row(method, args, Path(tmp))
            rows.append(row)
            if "error" in row:
                console.print("[red]failed[/]")
            else:
                console.print(
                    f"{row['seconds']:.1f} s, peak {row['peak_mib']:.0f} MiB, "
                    f"cos mean {row['cos_mean']:.5f}"
                )
    args.load_after = os.getloadavg()[0]
    report = render(rows, args, time.perf_counter() - start)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)
    console.print(f"written to {args.output}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
