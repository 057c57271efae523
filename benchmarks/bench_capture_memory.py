"""Peak memory of ``calibrate_onnx``'s ONNX Runtime capture does not grow with the data set.

Calibrates the demo model (all-MiniLM-L6-v2 as ONNX) with N batches and with ``factor * N``
batches of the same shape, each in a fresh process, and compares the peak RSS. The batches are
random token ids of the model's vocabulary, made one at a time by a generator function passed as
a callable, so the data set itself is never held in memory (the callable is called again for the
second pass that mse needs, and yields the same batches). PASS when the larger run's peak RSS is
within 10% of the smaller run's. Not a test; run it by hand:

    python benchmarks/bench_capture_memory.py [--batches 8] [--mse-batches 4] [--factor 10]
        [--batch-size 8] [--seq-len 64] [--methods max mse]

The table is printed and written to ``benchmarks/results/capture_memory.md``.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import harness

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_FILE = RESULTS_DIR / "capture_memory.md"
TOLERANCE = 0.10
SEED = 0
FIRST_ID = 1000  # skip [PAD], [unused*] and the special tokens at the start of the vocab


def token_batches(
    num_batches: int, batch_size: int, seq_len: int, vocab_size: int
) -> Callable[[], Iterator[dict[str, Any]]]:
    """A callable whose every call yields the same ``num_batches`` feeds, made one at a time.

    Each feed: input_ids int64 [batch_size, seq_len] uniform in [FIRST_ID, vocab_size), an
    attention mask of ones and token type ids of zeros.
    """
    import numpy as np

    def batches() -> Iterator[dict[str, Any]]:
        for index in range(num_batches):
            rng = np.random.default_rng((SEED, index))
            yield {
                "input_ids": rng.integers(FIRST_ID, vocab_size, (batch_size, seq_len)),
                "attention_mask": np.ones((batch_size, seq_len), dtype=np.int64),
                "token_type_ids": np.zeros((batch_size, seq_len), dtype=np.int64),
            }

    return batches


def run_row(args: argparse.Namespace) -> dict[str, Any]:
    """One calibration in this process: peak RSS before and after, time, batches seen."""
    import logging

    import numpy as np  # noqa: F401  (imported before the baseline, like the libraries below)
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401
    from tokenizers import Tokenizer

    from qcal_export import calibrate_onnx
    from qcal_export.demo import demo_model_path
    from qcal_export.demo.texts import bundled_model_dir

    logging.basicConfig(level=logging.ERROR)
    model = demo_model_path()
    vocab_size = Tokenizer.from_file(str(bundled_model_dir() / "tokenizer.json")).get_vocab_size()
    data = token_batches(args.row_batches, args.batch_size, args.seq_len, vocab_size)
    baseline = harness.peak_rss_mib()
    start = time.perf_counter()
    result = calibrate_onnx(model, data, format="int8", method=args.row_method, validate_batches=0)
    seconds = time.perf_counter() - start
    peak = harness.peak_rss_mib()
    return {
        "method": args.row_method,
        "batches": args.row_batches,
        "seconds": seconds,
        "calibrate_s": result.timings.get("calibrate_s"),
        "baseline_mib": baseline,
        "peak_mib": peak,
        "increase_mib": peak - baseline,
        "batches_per_pass": result.report.get("batches_per_pass"),
    }


def spawn_row(method: str, batches: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Run this script with ``--row-method/--row-batches`` in a fresh interpreter."""
    argv = ["--row-method", method, "--row-batches", str(batches)]
    argv += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    label = {"method": method, "batches": batches}
    return harness.spawn_row(__file__, argv, tmp / f"{method}_{batches}.json", label)


def _versions() -> str:
    return ", ".join(f"{name} {version}" for name, version in harness.versions().items())


def render(
    pairs: list[tuple[dict[str, Any], dict[str, Any]]], args: argparse.Namespace, total_s: float
) -> tuple[str, bool]:
    """The markdown report and whether every method passed."""
    lines = [
        "# Peak memory of ORT capture vs number of calibration batches",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- versions: {_versions()}",
        f"- CPU: {os.cpu_count()} logical cores ({platform.machine()}), CPUExecutionProvider",
        "- model: all-MiniLM-L6-v2 (demo ONNX export); "
        "`calibrate_onnx(format='int8', method=..., validate_batches=0)`, no files written",
        f"- data: random token ids, batches of {args.batch_size} x {args.seq_len} tokens, "
        "made lazily by a generator function (the callable is re-called for a second pass)",
        f"- total benchmark wall time: {total_s:.0f} s; 1-min load average "
        f"{args.load_before:.1f} before, {args.load_after:.1f} after",
        "",
        "| method | batches | batches per pass | wall time (s) | baseline RSS (MiB) "
        "| peak RSS (MiB) | increase (MiB) | peak ratio | increase ratio | within 10% |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    all_pass = True
    errors = []
    for small, large in pairs:
        for row in (small, large):
            if "error" in row:
                errors.append(row)
        if "error" in small or "error" in large:
            all_pass = False
            lines.append(f"| {small['method']} | {small['batches']}/{large['batches']} | failed |")
            continue
        ratio = large["peak_mib"] / small["peak_mib"]
        increase_ratio = (
            large["increase_mib"] / small["increase_mib"] if small["increase_mib"] > 0 else 0.0
        )
        passed = ratio <= 1 + TOLERANCE
        all_pass &= passed
        for row, cells in (
            (small, "1.00 | 1.00 | |"),
            (large, f"{ratio:.3f} | {increase_ratio:.3f} | {'PASS' if passed else 'FAIL'} |"),
        ):
            lines.append(
                f"| {row['method']} | {row['batches']} | {row['batches_per_pass']} "
                f"| {row['seconds']:.1f} "
                f"| {row['baseline_mib']:.0f} | {row['peak_mib']:.0f} "
                f"| {row['increase_mib']:.0f} | {cells}"
            )
    lines += [
        "",
        "Notes:",
        "- Each run is a fresh process; baseline RSS is `ru_maxrss` after imports and loading "
        "the model path, before calibrating; peak RSS is `ru_maxrss` after `calibrate_onnx` "
        "returns; increase = peak - baseline. Ratios are larger run / smaller run.",
        f"- PASS: the larger run's peak RSS is at most {1 + TOLERANCE:.2f} x the smaller run's.",
    ]
    for row in errors:
        lines += [
            "",
            f"{row['method']} with {row['batches']} batches failed:",
            "",
            "```",
            row["error"],
            "```",
        ]
    return "\n".join(lines) + "\n", all_pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8, help="N for method max")
    parser.add_argument("--mse-batches", type=int, default=4, help="N for method mse")
    parser.add_argument("--factor", type=int, default=10, help="the larger run has factor * N")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--methods", nargs="+", choices=("max", "mse"), default=["max", "mse"])
    parser.add_argument("--output", type=Path, default=RESULT_FILE, help="markdown result file")
    # Internal: one run in this process.
    parser.add_argument("--row-method", choices=("max", "mse"), help=argparse.SUPPRESS)
    parser.add_argument("--row-batches", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.row_method:
        Path(args.json).write_text(json.dumps(run_row(args)))
        return 0
    from rich.console import Console

    console = Console(highlight=False)
    args.load_before = os.getloadavg()[0]
    start = time.perf_counter()
    pairs = []
    with tempfile.TemporaryDirectory(prefix="qcal-bench-") as tmp:
        for method in args.methods:
            n = args.batches if method == "max" else args.mse_batches
            rows = []
            for batches in (n, args.factor * n):
                console.print(f"[bold]{method}[/], {batches} batches ...", end=" ")
                row = spawn_row(method, batches, args, Path(tmp))
                rows.append(row)
                if "error" in row:
                    console.print("[red]failed[/]")
                else:
                    console.print(f"{row['seconds']:.1f} s, peak {row['peak_mib']:.0f} MiB")
            pairs.append((rows[0], rows[1]))
    args.load_after = os.getloadavg()[0]
    report, all_pass = render(pairs, args, time.perf_counter() - start)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)
    console.print(f"{'PASS' if all_pass else 'FAIL'}; written to {args.output}")
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
