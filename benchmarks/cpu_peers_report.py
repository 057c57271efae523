"""The report of ``bench_cpu_peers.py``: tables, header (machine, versions) and notes."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import torch


def table(rows: list[dict[str, Any]], peer: str) -> list[str]:
    head = (
        f"| tensor | shape | format | granularity | ours wall (s) | {peer} wall (s) | ours / "
        f"{peer} wall | ours / {peer} CPU time | chosen amax / initial: ours | {peer} "
        "| amax max rel diff | groups differing |"
    )
    lines = [head, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        case = row["case"]
        cells = [
            case.tensor,
            "x".join(map(str, row["shape"])),
            case.fmt,
            case.granularity,
            f"{row['ours_s']:.2f}",
        ]
        if "peer_s" in row:
            cells += [
                f"{row['peer_s']:.2f}",
                f"{row['ours_s'] / row['peer_s']:.2f}",
                f"{row['ours_cpu'] / row['peer_cpu']:.2f}",
                row["ours_m"],
                row["peer_m"],
                f"{row['diff']:.1e}",
                f"{row['differ']} / {row['groups']}",
            ]
        else:
            cells += ["-", "-", "-", row["ours_m"], "-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def rule_lines(rows: list[dict[str, Any]]) -> list[str]:
    checked = [r for r in rows if "rule_diff" in r]
    if not checked:
        return []
    lines = [
        "",
        "Symmetric int8 with compressed-tensors' scale rule (`amax / 127.5`) in our search "
        "(a diagnostic format of this script): against llmcompressor's observer",
        "",
        "| tensor | granularity | amax max rel diff | groups differing |",
        "|---|---|---:|---:|",
    ]
    for row in checked:
        case = row["case"]
        lines.append(
            f"| {case.tensor} | {case.granularity} | {row['rule_diff']:.1e} "
            f"| {row['rule_differ']} / {row['groups']} |"
        )
    return lines


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def render(
    args: argparse.Namespace, notes: dict[str, str], sections: list[tuple[str, list]]
) -> str:
    versions = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "nvidia-modelopt": version("nvidia-modelopt"),
        "llmcompressor": version("llmcompressor"),
        "compressed-tensors": version("compressed-tensors"),
    }
    lines = [
        "# qcal_export CPU MSE calibrators vs Model Optimizer and llmcompressor",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores; torch threads: "
        f"{torch.get_num_threads()}; 1-min load average {args.load_before:.1f} before, "
        f"{args.load_after:.1f} after",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- time: median wall time of {args.repeats} call(s) of collect + compute_amax on a "
        "fresh calibrator (observer), one batch, after a warm-up; the initial amax is computed "
        "outside; the CPU-time ratio uses the median process CPU time (all threads)"
        + ("; --quick (small tensors)" if args.quick else ""),
        "- tensors (float32, seed 0): activations with 0.5% outlier channels x20 and 1e-4 "
        "spikes x40, per tensor; a weight [out, in] with log-normal row scales, per output "
        "channel (axis 0)",
        *(f"- {name}: {note}" for name, note in notes.items()),
        "",
    ]
    for title, body in sections:
        lines += [title, "", *body, ""]
    return "\n".join(lines + NOTES) + "\n"


NOTES = [
    "Notes:",
    "- ModelOpt grid: `linspace(0.25, 4.0, 39)` (its default start 0.25, stop 4.0, step 0.1 "
    "give 39 steps); ours runs with step 3.75 / 38 so both score the same 39 multipliers. "
    "ModelOpt multiplies in float32 (`amax0 * m`), ours in float64 then rounds to float32: the "
    "candidates can differ by one float32 ulp (relative 6e-8), below the 1e-6 agreement line.",
    "- ModelOpt int8: `x * (127 / amax)`, round half to even, clamp [-128, 127], `/ (127 / "
    "amax)`; ours (ONNX QuantizeLinear): `x / (amax / 127)`, the same rounding and range, "
    "`* (amax / 127)`. fp8: ModelOpt `x * (448 / amax)` cast to e4m3 `* (1 / scale)`, ours "
    "`x / (amax / 448)` cast `* (amax / 448)`. ModelOpt sums the squared errors in float32, ours "
    "in float64. Any of these moves a near-tied argmin only.",
    "- llmcompressor (compressed-tensors) symmetric int8: `scale = amax / 127.5` (half the "
    "[-128, 127] span); ours `amax / 127` (ONNX's symmetric int8). The search scores a "
    "different quantizer, so the chosen shrink can differ; the diagnostic table runs our search "
    "with their scale rule. Asymmetric int8 (`scale = (max - min) / 255`, zero point rounded "
    "half to even) and fp8 (`amax / 448`) share the definition. llmcompressor sums "
    "`|xq - x| ** 2.4` in float32, ours in float64; its first best error is float32's max, "
    "ours infinity.",
    "- llmcompressor's eager CPU search is a Python loop over candidates, one full pass each, "
    "with the early stop. Ours (calibrators/shrink_cpu.py) scores the same candidates in the "
    "same order and stops at the same one: each error first in float32 (`exp(norm * log|xq - "
    "x|)`, float32 sums of 1024 terms, then float64), within a stated relative bound (1.5e-4 "
    "for norm 2.4) of the float64 error; a comparison with a group's best that the bounds "
    "cannot decide is redone in float64. Per channel, a group whose 32 largest values alone "
    "(float64) err more than its best is not scored for that candidate.",
    "- Ours per tensor: the multiplier sweep takes every candidate's float64 loss from one "
    "histogram of 1024-value float32 buckets (calibrators/bucket_sweep.py): exact per-bucket "
    "sums where the candidate maps the whole bucket to one value, the values themselves in the "
    "few buckets where its output changes. The shrink search sets apart the values that the "
    "smallest candidate scale already quantizes to 0 (then so does every candidate) and adds "
    "their error once (calibrators/cpu_sweep.py). Per channel the sweep scores all 39 "
    "candidates in float64 on cache-sized tiles of whole rows.",
    "- Load: other jobs share the 2 cores (see the load averages above); the wall times of "
    "both sides stretch with it, the CPU-time ratio less so.",
    "- Threads: 1 by default. On this shared 2-core machine (1-min load 2 to 5 from other jobs) "
    "2 threads made the same call 3 to 7 times slower and erratic (the 1M-element int8 sweep: "
    "0.36 s with 1 thread, 1.0 to 3.8 s with 2): a parallel op waits for a descheduled thread.",
    "- Grid edges: with these outliers int8 per tensor picks the smallest multiplier (0.25) on "
    "both sides, and fp8's loss is nearly flat in the amax (its relative error barely depends "
    "on the scale), so its argmin can sit at 4.0. Agreement there is exact, but those amaxes "
    "say more about the grid than about the data.",
]
