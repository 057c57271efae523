"""Calibration throughput on the demo model with 1 and N processes (``torch.distributed``).

Each configuration runs under torch's launcher (``torchrun --standalone``): every process
calibrates its share of the demo's calibration batches (``calibrate_onnx`` reads torchrun's
environment), the states merge after each pass, rank 0 writes. The time is rank 0's wall time
of the ``calibrate_onnx`` call (merges included, process start-up and imports not). On a GPU
machine ``--provider cuda`` puts rank ``r`` on GPU ``r`` (NCCL); on the CPU the processes use
gloo and share the cores (torchrun sets one thread each). Not a test; run it by hand:

    python benchmarks/bench_distributed.py [--nproc 1 2] [--method max] [--provider cpu]

The table is printed and written to ``benchmarks/results/distributed_<provider>.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

RESULTS = Path(__file__).resolve().parent / "results"


def worker(args: argparse.Namespace) -> None:
    """One rank: calibrate the demo model on its share; rank 0 prints its time as JSON."""
    from qcal_export.demo.model import demo_model_path
    from qcal_export.demo.texts import demo_batches, demo_texts
    from qcal_export.pipeline.calibrate import calibrate_onnx

    texts, _ = demo_texts(args.num_calib, 0)
    batches = demo_batches(texts, batch_size=16)
    model = demo_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        calibrate_onnx(
            model,
            batches,
            format="int8",
            method=args.method,
            provider=args.provider,
            output=Path(tmp) / "q.onnx",
            validate_batches=0,
        )
        seconds = time.perf_counter() - start
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"seconds": seconds, "samples": len(texts)}))


def measure(args: argparse.Namespace, nproc: int) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", __file__, "--worker", "--method", args.method]
    command += ["--provider", args.provider, "--num-calib", str(args.num_calib)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--method", default="max")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--num-calib", type=int, default=256)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = {n: measure(args, n) for n in args.nproc}
    base = rows[args.nproc[0]]["seconds"]
    lines = [
        f"# Distributed calibration throughput ({args.provider}, method {args.method})",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; {os.cpu_count()} cores",
        f"- versions: {', '.join(f'{k} {v}' for k, v in harness.versions().items())}",
        f"- demo model, {args.num_calib} calibration texts in batches of 16",
        "",
        "| processes | seconds | samples/s | speed-up |",
        "| ---: | ---: | ---: | ---: |",
        *(
            f"| {n} | {r['seconds']:.2f} | {r['samples'] / r['seconds']:.1f} "
            f"| {base / r['seconds']:.2f}x |"
            for n, r in rows.items()
        ),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / f"distributed_{args.provider}.md").write_text(text)


if __name__ == "__main__":
    main()
