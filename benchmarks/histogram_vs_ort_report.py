"""The report of ``bench_histogram_vs_ort.py``: ours vs ORT per tensor, and the tables."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
from typing import Any

import harness


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
