"""Accuracy steps on the demo model: int8 W8A8 (or ``--format F``, weights and activations)
with each activation method, smoothing, method search and a precision target, scored on the
held-out texts.

Each row is ``METHOD[:ALPHA][@TARGET]`` (``auto:0.8@0.99``: method auto, ``--smooth 0.8``,
``--target-cosine 0.99``); weights are per-channel int8 with max, all MatMuls are quantized
unless a target leaves some in float. Per row: mean and min cosine of the sentence embeddings
against the float model on the 128 held-out texts, the MatMuls left in int8, the target's own
held-out split figure, and the wall time of the calibration; under the table each row's
phase times and its time over the first ``max`` row's (same run). Not a test; run it by hand:

    python benchmarks/bench_accuracy_steps.py [--rows max mse auto:0.8 max@0.99 ...] [--output F]
        [--format nvfp4] [--profile P]

``--profile P`` writes ``cProfile``'s view of the last row (its calibration and held-out
scoring) to ``P``: the functions of most own time, then those of ``qcal_export`` by cumulative
time (that row's time then includes the profiler's cost).

The table is printed and written to ``benchmarks/results/accuracy_steps.md`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import io
import os
import pstats
import tempfile
import time
from collections import Counter
from pathlib import Path

import harness
import numpy as np

from qcal_export.calibrators import threads
from qcal_export.demo.evaluate import embedding_cosine
from qcal_export.demo.model import demo_model_path
from qcal_export.demo.texts import demo_batches, demo_texts
from qcal_export.pipeline.calibrate import calibrate_onnx

RESULT_FILE = Path(__file__).resolve().parent / "results" / "accuracy_steps.md"
ROWS = (
    "max", "mse", "percentile", "mse:0.8", "max:0.5", "max:0.8", "percentile:0.8", "auto",
    "auto:0.8", "max@0.99", "mse@0.99", "auto@0.99", "auto:0.8@0.99",
)  # fmt: skip


def parse_row(text: str) -> tuple[str, float | None, float | None]:
    """``METHOD[:ALPHA][@TARGET]`` -> (method, alpha, target)."""
    rest, _, target = text.partition("@")
    method, _, alpha = rest.partition(":")
    return method, float(alpha) if alpha else None, float(target) if target else None


def run_row(
    text: str,
    model: Path,
    calib: list,
    heldout: list,
    out: Path,
    auto_samples: int,
    fmt: str = "int8",
    provider: str = "auto",
) -> tuple[str, float, dict]:
    method, alpha, target = parse_row(text)
    start = time.perf_counter()
    result = calibrate_onnx(
        model,
        calib,
        output=out,
        format=fmt,
        method=method,
        weight_method="max",
        validate_batches=0,
        smooth=alpha,
        target_cosine=target,
        auto_samples=auto_samples,
        provider=provider,
    )
    seconds = time.perf_counter() - start
    score = embedding_cosine(model, out, heldout)
    precision = result.report.get("precision")
    share = precision["quantized_matmul_gemm"] if precision else None
    kept = f"{share['quantized']} of {share['of']}" if share else "all"
    split = f"{precision['heldout_exported']['cosine']:.4f}" if precision else ""
    picked = Counter(c["picked"] for c in result.report.get("method_choice", {}).values())
    picks = ", ".join(f"{m} {n}" for m, n in picked.most_common())
    line = (
        f"| {method} | {alpha or ''} | {target or ''} | {score['mean']:.4f} | {score['min']:.4f} "
        f"| {kept} | {split} | {seconds:.0f} | {picks} |"
    )
    return line, seconds, result.timings


def tokenized() -> tuple[list[dict], list[dict]]:
    """The 256 calibration and 128 held-out demo texts, tokenized in batches of 16."""
    calib_texts, heldout_texts = demo_texts(256, 128)
    return demo_batches(calib_texts, batch_size=16), demo_batches(heldout_texts, batch_size=16)


def save_inputs(folder: Path, calib: list[dict], heldout: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, batches in (("calib", calib), ("heldout", heldout)):
        arrays = {f"{i}/{k}": v for i, batch in enumerate(batches) for k, v in batch.items()}
        np.savez(folder / f"{name}.npz", **arrays)


def load_inputs(folder: Path) -> tuple[list[dict], list[dict]]:
    out = []
    for name in ("calib", "heldout"):
        batches: dict[int, dict] = {}
        with np.load(folder / f"{name}.npz") as saved:
            for key in saved.files:
                index, _, input_name = key.partition("/")
                batches.setdefault(int(index), {})[input_name] = saved[key]
        out.append([batches[i] for i in sorted(batches)])
    return out[0], out[1]


def write_profile(profiler: cProfile.Profile, path: Path) -> None:
    """The functions of most own time, then ``qcal_export``'s by cumulative time."""
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumtime").print_stats("qcal_export", 60)
    path.write_text(text.getvalue())


def limit_host_workers(count: int) -> None:
    """At most ``count`` host threads collect and decide side by side (``HOST_WORKERS``)."""
    threads.HOST_WORKERS = count


def device(provider: str) -> str:
    """The ONNX Runtime provider the runs use, and the GPU where there is one."""
    import onnxruntime as ort
    import torch

    cuda = provider != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"ORT {'CUDA' if cuda else 'CPU'} EP{gpu}"


def header(args: argparse.Namespace) -> list[str]:
    """The results file's title, setting and table head."""
    return [
        f"# Accuracy steps: {args.format} weights and activations on the demo model",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; {os.cpu_count()} cores; "
        f"{device(args.provider)}; host workers {args.host_workers or threads.HOST_WORKERS}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in harness.versions().items())}",
        "- 256 calibration texts (16 batches of 16), 128 held-out texts; weights "
        f"{args.format} max (int8: per channel); a target holds out every 5th calibration "
        f"batch; method auto scores on {args.auto_samples} samples",
        "",
        "| activations | smooth | target cosine | mean cosine | min cosine | MatMuls quantized "
        "| held-out split | time (s) | auto picked |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]


def run_rows(
    args: argparse.Namespace, model: Path, calib: list, heldout: list
) -> tuple[list[str], list[str]]:
    """Each row's table line, and the notes of their phase times and time over the first max
    row's; the last row profiled where ``--profile`` asks."""
    lines = []
    notes = ["", "Phase times (s) and time over the first max row's, from this run:", ""]
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for index, text in enumerate(args.rows):
            last = index == len(args.rows) - 1
            profiler = cProfile.Profile() if args.profile and last else None
            with profiler or contextlib.nullcontext():
                line, seconds, timings = run_row(
                    text, model, calib, heldout, Path(tmp) / "q.onnx", args.auto_samples,
                    args.format, args.provider,
                )  # fmt: skip
            if profiler:
                write_profile(profiler, args.profile)
            lines.append(line)
            print(line, flush=True)
            base = seconds if base is None and text == "max" else base
            ratio = f"; {seconds / base:.1f}x max" if base else ""
            phases = ", ".join(f"{name} {value:.1f}" for name, value in timings.items())
            notes.append(f"- {text}: {seconds:.1f} s ({phases}){ratio}")
    return lines, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help="METHOD[:ALPHA][@TARGET]")
    parser.add_argument("--output", type=Path, default=RESULT_FILE, help="the table's file")
    parser.add_argument(
        "--inputs", type=Path, help="tokenized batches saved by --save-inputs (no tokenizer)"
    )
    parser.add_argument("--save-inputs", type=Path, help="save the tokenized batches and stop")
    parser.add_argument("--auto-samples", type=int, default=4, help="method auto's samples")
    parser.add_argument("--format", default="int8", help="weights' and activations' format")
    parser.add_argument("--profile", type=Path, help="write the last row's cProfile here")
    parser.add_argument("--provider", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--host-workers",
        type=int,
        help="most host threads that collect and decide side by side (default: HOST_WORKERS; "
        "1 is how it was before they did)",
    )
    args = parser.parse_args()
    if args.host_workers:
        limit_host_workers(args.host_workers)
    model = demo_model_path()
    calib, heldout = load_inputs(args.inputs) if args.inputs else tokenized()
    if args.save_inputs:
        save_inputs(args.save_inputs, calib, heldout)
        return
    lines = header(args)
    rows, notes = run_rows(args, model, calib, heldout)
    lines += rows + notes
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
