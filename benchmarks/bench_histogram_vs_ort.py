"""Ours vs ONNX Runtime's Percentile and Entropy calibrators on the demo model: thresholds,
time and peak memory.

Both calibrate the same activation tensors (the float inputs and outputs of every MatMul and
Gemm, as ORT's ``create_calibrator`` selects them) over the same padded batches of the demo
calibration texts. ORT: ``create_calibrator`` -> ``collect_data`` -> ``compute_data``. Ours:
``OrtCapture`` streaming each batch into a ``PercentileCalibrator`` / ``EntropyCalibrator`` per
tensor (int8, per tensor) -> ``compute_amax``. Each row runs in a fresh process (``--row``), so
its peak RSS (``ru_maxrss``) is its own. Not a test; run it by hand:

    python benchmarks/bench_histogram_vs_ort.py [--num-calib 256] [--batch-size 16]

The tables are printed and written to ``benchmarks/results/histogram_vs_ort.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import ort_static_rows

RESULT_FILE = Path(__file__).resolve().parent / "results" / "histogram_vs_ort.txt"
OP_TYPES = ["MatMul", "Gemm"]
ORT_OPTIONS = {
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": True},
    "entropy": {"num_bins": 2048, "num_quantized_bins": 128, "symmetric": True},
}
ROWS = ("ours-percentile", "ort-percentile", "ours-entropy", "ort-entropy")


# --------------------------------------------------------------------------------------------
# One row, in a fresh process
# --------------------------------------------------------------------------------------------


def load_batches(args: argparse.Namespace) -> list[dict]:
    """The demo calibration batches, padded to the longest text (ORT's histogram calibrators
    stack every batch's outputs, so they need one shape)."""
    from qcal_export.demo import demo_batches, demo_texts

    calib, _ = demo_texts(args.num_calib, 0)
    batches = demo_batches(calib, batch_size=args.batch_size)
    return ort_static_rows.pad_to(batches, max(b["input_ids"].shape[1] for b in batches))


def calibrate_ours(model: Path, batches: list[dict], tensors: list[str], method: str) -> dict:
    """Capture ``tensors`` batch by batch into our calibrators; amax per tensor, decide time."""
    import onnx
    from onnx import TensorProto

    from qcal_export.calibrators import EntropyCalibrator, PercentileCalibrator
    from qcal_export.capture.data import open_data
    from qcal_export.capture.onnxruntime import OrtCapture
    from qcal_export.formats import INT8
    from qcal_export.granularity import PerTensor

    kind = {"percentile": PercentileCalibrator, "entropy": EntropyCalibrator}[method]
    cals = {t: kind(INT8, PerTensor()) for t in tensors}
    capture = OrtCapture(
        onnx.load(str(model)),
        {t: TensorProto.FLOAT for t in tensors},
        providers=["CPUExecutionProvider"],
    )
    collect_seconds = 0.0

    def collect(name: str, value: Any) -> None:
        nonlocal collect_seconds
        begin = time.perf_counter()
        cals[name].collect(value)
        collect_seconds += time.perf_counter() - begin

    capture.run(open_data(batches), collect)
    start = time.perf_counter()
    amax = {t: float(cal.compute_amax()) for t, cal in cals.items()}
    decide = time.perf_counter() - start
    found: dict[str, Any] = {"amax": amax, "width": {}, "hist": {}}
    for tensor, cal in cals.items():
        counts, width = cal.histogram()
        found["width"][tensor], found["hist"][tensor] = float(width), counts[0].tolist()
    return {**found, "collect_seconds": collect_seconds, "decide_seconds": decide}


def calibrate_ort(model: Path, batches: list[dict], method: str, work_dir: Path) -> dict:
    """ORT's calibrator over the same batches; amax, bin width and histogram per tensor."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(
        str(model),
        OP_TYPES,
        augmented_model_path=str(work_dir / f"augmented-{method}.onnx"),
        calibrate_method=getattr(CalibrationMethod, method.capitalize()),
        extra_options=ORT_OPTIONS[method],
    )
    calibrator.collect_data(ort_static_rows.ort_reader(batches))
    start = time.perf_counter()
    data = calibrator.compute_data()
    decide = time.perf_counter() - start
    found: dict[str, Any] = {"amax": {}, "width": {}, "hist": {}, "absmax": {}}
    found["decide_seconds"] = decide
    histograms = calibrator.collector.histogram_dict
    for tensor, td in data.items():
        lowest, highest = td.range_value
        counts, edges = histograms[tensor][:2]
        found["amax"][tensor] = max(abs(float(lowest)), abs(float(highest)))
        found["width"][tensor] = float(edges[1] - edges[0])
        found["hist"][tensor] = counts.tolist()
        found["absmax"][tensor] = float(edges[-1])
    return found


def run_row(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    import numpy as np  # noqa: F401  (imported before the baseline, like the libraries below)
    import onnxruntime.quantization  # noqa: F401
    import torch

    import qcal_export.calibrators  # noqa: F401
    from qcal_export.demo import demo_model_path

    logging.basicConfig(level=logging.ERROR)
    model = demo_model_path()
    batches = load_batches(args)
    tensors = json.loads(Path(args.tensors).read_text())
    who, method = args.row.split("-")
    baseline = harness.peak_rss_mib()
    start = time.perf_counter()
    if who == "ours":
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        found = calibrate_ours(model, batches, tensors, method)
    else:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            found = calibrate_ort(model, batches, method, Path(args.work_dir))
    seconds = time.perf_counter() - start
    peak = harness.peak_rss_mib()
    return {
        "row": args.row,
        "seconds": seconds,
        "baseline_mib": baseline,
        "peak_mib": peak,
        **found,
    }


def select_tensors(work_dir: Path) -> list[str]:
    """The tensors ORT's histogram calibrators take for MatMul/Gemm, in graph order."""
    from onnxruntime.quantization.calibrate import CalibraterBase
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    from qcal_export.demo import demo_model_path

    model = load_model_with_shape_infer(demo_model_path())
    rule = argparse.Namespace(op_types_to_calibrate=OP_TYPES)
    chosen, _ = CalibraterBase.select_tensors_to_calibrate(rule, model)
    order = [t for n in model.graph.node for t in (*n.input, *n.output)]
    ordered = sorted(chosen, key=order.index)
    (work_dir / "tensors.json").write_text(json.dumps(ordered))
    return ordered


# --------------------------------------------------------------------------------------------
# Comparison and tables
# --------------------------------------------------------------------------------------------


def compare(method: str, ours: dict, ort: dict) -> list[dict[str, Any]]:
    """Per tensor: ours and ORT's amax, their bin widths, the difference in ORT bins, and the
    diagnostics of ``percentile_checks`` / ``entropy_checks``."""
    checks = percentile_checks if method == "percentile" else entropy_checks
    records = []
    for tensor, amax in ours["amax"].items():
        width = ort["width"][tensor]
        record = {"tensor": tensor, "ours": amax, "ort": ort["amax"][tensor], "ort_bin": width}
        record["our_bin"] = ours["width"][tensor]
        record["diff"] = (amax - record["ort"]) / width
        records.append({**record, **checks(tensor, record, ours, ort)})
    return records


def percentile_checks(tensor: str, record: dict, ours: dict, ort: dict) -> dict[str, float]:
    """ORT returns its bin's lower edge, ours the upper: ORT's upper edge is ours on ORT's
    histogram, and differs from ours by less than the wider of the two bins."""
    upper = min(record["ort"] + record["ort_bin"], ort["absmax"][tensor])
    return {"same_rule": (record["ours"] - upper) / max(record["ort_bin"], record["our_bin"])}


def entropy_checks(tensor: str, record: dict, ours: dict, ort: dict) -> dict[str, float]:
    """Our KL search on ORT's own histogram (what ORT's rule gives without its quirks), and
    our KL at ORT's threshold relative to our minimum (how flat the curve is)."""
    import torch

    from qcal_export.calibrators.entropy import QUANTIZED_BINS, window_divergence

    hist = torch.tensor(ort["hist"][tensor], dtype=torch.int64)[None]
    half, kl = window_divergence(hist, QUANTIZED_BINS)
    on_ort = min(int(half[int(kl[0].argmin())]) * record["ort_bin"], ort["absmax"][tensor])
    half, kl = window_divergence(torch.tensor(ours["hist"][tensor])[None], QUANTIZED_BINS)
    at = round(record["ort"] / record["our_bin"]) - int(half[0])
    at = min(max(at, 0), len(half) - 1)
    return {
        "ours_on_ort": on_ort,
        "rule_vs_ort": (on_ort - record["ort"]) / record["ort_bin"],
        "hist_vs_ours": (record["ours"] - on_ort) / record["ort_bin"],
        "kl_ratio": float(kl[0, at] / kl[0].min()),
    }


def _summary(values: list[float]) -> str:
    magnitudes = sorted(abs(v) for v in values)
    within = sum(v <= 1 for v in magnitudes)
    return f"{within} / {len(values)} | {magnitudes[-1]:.2f} | {statistics.median(magnitudes):.2f}"


def cost_table(ours: dict, ort: dict) -> list[str]:
    """Wall time, decision time and peak RSS, ours vs ORT."""
    ours_gain = ours["peak_mib"] - ours["baseline_mib"]
    ort_gain = ort["peak_mib"] - ort["baseline_mib"]
    rows = [
        ("wall time (s): session + capture + calibrate", ours["seconds"], ort["seconds"], 1),
        ("threshold decision (s), all tensors", ours["decide_seconds"], ort["decide_seconds"], 2),
        ("peak RSS (MiB)", ours["peak_mib"], ort["peak_mib"], 0),
        ("RSS increase over baseline (MiB)", ours_gain, ort_gain, 0),
    ]
    lines = ["| | ours | ORT | ours / ORT |", "|---|---:|---:|---:|"]
    for label, a, b, digits in rows:
        lines.append(f"| {label} | {a:.{digits}f} | {b:.{digits}f} | {a / b:.3f} |")
    return lines


def method_table(method: str, ours: dict, ort: dict, records: list[dict]) -> list[str]:
    """Cost table, threshold agreement summary and the largest differences of one method."""
    ratio = [r["our_bin"] / r["ort_bin"] for r in records]
    lines = [f"## {method}: {len(records)} tensors", "", *cost_table(ours, ort), ""]
    lines += [
        f"Our bin / ORT bin: {min(ratio):.2f} .. {max(ratio):.2f}. Our collect() calls took "
        f"{ours['collect_seconds']:.1f} s of our wall time (the rest: ORT session and inference).",
        "",
        "| comparison (in bins) | within 1 bin | worst | median |",
        "|---|---:|---:|---:|",
        f"| ours vs ORT (ORT bins) | {_summary([r['diff'] for r in records])} |",
    ]
    if method == "percentile":
        lines.append(
            "| ours vs ORT's upper bin edge (the wider bin) | "
            f"{_summary([r['same_rule'] for r in records])} |"
        )
    else:
        lines += [
            f"| our rule on ORT's histogram vs ORT (ORT bins) | "
            f"{_summary([r['rule_vs_ort'] for r in records])} |",
            f"| ours vs our rule on ORT's histogram (ORT bins) | "
            f"{_summary([r['hist_vs_ours'] for r in records])} |",
        ]
    return lines + worst_rows(method, records)


def worst_rows(method: str, records: list[dict]) -> list[str]:
    head = "| tensor | ours | ORT | diff (ORT bins) | our bin / ORT bin |"
    extra = " our rule on ORT hist | our KL at ORT / our min KL |" if method == "entropy" else ""
    lines = ["", "Largest differences:", "", head + extra, "|---|---:|---:|---:|---:|"]
    lines[-1] += "---:|---:|" if extra else ""
    for r in sorted(records, key=lambda r: abs(r["diff"]))[-6:][::-1]:
        row = f"| {r['tensor']} | {r['ours']:.4f} | {r['ort']:.4f} | {r['diff']:+.1f} "
        row += f"| {r['our_bin'] / r['ort_bin']:.2f} |"
        if extra:
            row += f" {r['ours_on_ort']:.4f} | {r['kl_ratio']:.2f} |"
        lines.append(row)
    if method == "entropy":
        ratios = sorted(r["kl_ratio"] for r in records)
        lines += [
            "",
            f"Our KL at ORT's threshold / our minimum KL: median {statistics.median(ratios):.3f}, "
            f"{sum(x <= 1.05 for x in ratios)} of {len(ratios)} tensors within 5%, worst "
            f"{ratios[-1]:.1f}.",
        ]
    return lines


def render(rows: dict, tensors: list[str], args: argparse.Namespace, total_s: float) -> str:
    versions = harness.versions()
    lines = [
        "# qcal_export histogram calibrators vs ONNX Runtime's Percentile and Entropy",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- CPU: {os.cpu_count()} logical cores ({platform.machine()}), no GPU used; 1-min load "
        f"average {args.load_before:.1f} before, {args.load_after:.1f} after; {total_s:.0f} s",
        f"- model: all-MiniLM-L6-v2 (demo ONNX export); {len(tensors)} tensors: the float inputs "
        "and outputs of every MatMul/Gemm, as ORT's create_calibrator selects them",
        f"- data: {args.num_calib} demo calibration texts, batches of {args.batch_size}, padded to "
        "the longest text (ORT's histogram calibrators need one shape)",
        "- ORT: create_calibrator(Percentile: num_bins 2048, percentile 99.999, symmetric; "
        "Entropy: num_bins 2048, num_quantized_bins 128, symmetric) -> collect_data -> "
        "compute_data",
        "- ours: PercentileCalibrator / EntropyCalibrator(int8, per tensor, defaults: bins 2048 a "
        "side, percentile 99.999, quantized_bins 128), fed batch by batch by OrtCapture; "
        f"torch threads in our rows: {args.torch_threads or 'torch default'}",
        "- amax compared: ours compute_amax(); ORT max(|lowest|, |highest|)",
        "- memory: peak RSS (ru_maxrss) of each row's fresh process; baseline = after imports and "
        "tokenized data",
        "",
    ]
    for method in args.methods:
        ours, ort = rows[f"ours-{method}"], rows[f"ort-{method}"]
        if "error" in ours or "error" in ort:
            lines += [
                f"## {method}: failed",
                "",
                "```",
                ours.get("error") or ort["error"],
                "```",
                "",
            ]
            continue
        lines += [*method_table(method, ours, ort, compare(method, ours, ort)), ""]
    return "\n".join(lines + NOTES) + "\n"


NOTES = [
    "Notes:",
    "- Percentile: ORT returns the lower edge of the bin where the |x| cdf reaches 99.999%, ours "
    "the upper edge (so percentile 100 is the max); ORT's 2048 bins span [min|x|, max|x|], ours "
    "are powers of two spanning [0, 2048 w) with 2048 w > max|x|, so 1 to 2 ORT bins wide. The "
    "two thresholds are each within one own bin of the true percentile, hence up to about 3 ORT "
    "bins apart; with the same rule (ORT's upper edge) they agree to within the wider bin.",
    "- Entropy: ORT's search differs from the definition ours follows in four ways: its window "
    "has i bins left of zero and i + 1 right; it truncates q to integers; it leaves q empty on "
    "the remainder bins of the last quantized bin (their p keeps its counts, the edge bin with "
    "the clipped outliers among them); and it spreads q over the bins where p is 0 too. 'Our "
    "rule on ORT's histogram' runs our search on ORT's own histogram: its distance to ORT is "
    "what those differences do; its distance to ours is what the histogram does (our bins are "
    "0.5 to 1 ORT bin wide, on other edges).",
    "- The KL curve over thresholds is flat with many local minima on these activations, so the "
    "argmin moves by many bins with either change; 'our KL at ORT / our min KL' says how much "
    "worse ORT's threshold is by our criterion. On Softmax outputs ORT keeps its smallest window "
    "(64 bins, ~0.06 of a [0, 1] range), which clips most of the distribution's tail.",
    "- ORT's Entropy defaults (num_bins 128, num_quantized_bins 128) leave a single window, the "
    "full range, i.e. MinMax; this benchmark passes num_bins 2048 to get a search.",
    "- Threads: ORT's session (on both sides) runs its intra-op pool on every core; our "
    "collect() runs torch ops in the same process. On this shared 2-core machine torch's "
    "default 2 OpenMP threads made collect() several times slower than 1 thread (a parallel op "
    "waits for a descheduled thread), so our rows run with 1 unless --torch-threads says so.",
    "- Times include the model's inference (both capture the same tensors). ORT keeps every "
    "batch's outputs until collect_data ends; ours keeps one batch plus a [2 x 2048] int64 "
    "histogram per tensor.",
]


def spawn_row(row: str, args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    argv = ["--row", row, "--num-calib", str(args.num_calib), "--batch-size", str(args.batch_size)]
    argv += ["--work-dir", str(work_dir), "--tensors", str(work_dir / "tensors.json")]
    argv += ["--torch-threads", str(args.torch_threads)]
    return harness.spawn_row(__file__, argv, work_dir / f"{row}.json", {"row": row})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-calib", type=int, default=256, help="calibration texts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--methods", nargs="+", choices=list(ORT_OPTIONS), default=list(ORT_OPTIONS)
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads in our rows (0: torch's default); ORT's session pool takes the cores",
    )
    parser.add_argument("--output", type=Path, default=RESULT_FILE, help="result file")
    parser.add_argument("--raw", type=Path, help="also save every row's JSON here")
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--tensors", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.row:
        Path(args.json).write_text(json.dumps(run_row(args)))
        return 0
    args.load_before = os.getloadavg()[0]
    start = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="qcal-bench-hist-") as tmp:
        work_dir = Path(tmp)
        tensors = select_tensors(work_dir)
        for method in args.methods:
            for who in ("ours", "ort"):
                row = f"{who}-{method}"
                print(f"{row} ...", end=" ", flush=True)
                rows[row] = spawn_row(row, args, work_dir)
                print(rows[row].get("error") or f"{rows[row]['seconds']:.1f} s")
    args.load_after = os.getloadavg()[0]
    if args.raw:
        args.raw.write_text(json.dumps(rows))
    report = render(rows, tensors, args, time.perf_counter() - start)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)
    return 1 if any("error" in r for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
