"""Calibration throughput on the demo model with 1 and N processes (``torch.distributed``).

Each configuration runs under torch's launcher (``torchrun --standalone``): every process
calibrates its share of the demo's calibration batches (``calibrate_onnx`` reads torchrun's
environment), the states merge after each pass, rank 0 writes the scales. The time is rank
0's wall time of the ``calibrate_onnx`` call (merges included, process start-up and imports
not). With ``--provider cuda`` each rank runs on the GPU of its ``LOCAL_RANK`` (``device_id``;
NCCL merges), and there must be a GPU per process; on the CPU the processes use gloo and share
the cores (torchrun sets one thread each). Every configuration's scales are compared with the
first one's (one process): the merge must give the same scales. Not a test; run it by hand:

    python benchmarks/bench_distributed.py [--nproc 1 2] [--method max] [--provider cpu|cuda]

The table is printed and written to ``$OUT/distributed_<provider>.md`` when ``OUT`` is set,
else to ``benchmarks/results/distributed_<provider>.md``.
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
from row_process import REPO, child_env

RESULTS = Path(__file__).resolve().parent / "results"


def worker(args: argparse.Namespace) -> None:
    """One rank: calibrate the demo model on its share, on GPU ``LOCAL_RANK`` under CUDA; every
    rank prints a JSON line (its time and device), rank 0 writes the scales."""
    from qcal_export.demo.model import demo_model_path
    from qcal_export.demo.texts import demo_batches, demo_texts
    from qcal_export.pipeline.calibrate import calibrate_onnx

    texts, _ = demo_texts(args.num_calib, 0)
    batches = demo_batches(texts, batch_size=16)
    model = demo_model_path()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        calibrate_onnx(
            model,
            batches,
            format="int8",
            method=args.method,
            provider=args.provider,
            device_id=local_rank if args.provider == "cuda" else 0,
            output=Path(tmp) / "q.onnx",
            scales=args.scales,
            validate_batches=0,
        )
        seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "rank": int(os.environ.get("RANK", "0")),
                "device": _device(args.provider),
                "seconds": seconds,
                "samples": len(texts),
            }
        )
    )


def _device(provider: str) -> str:
    """Where this rank's torch work ran: its current CUDA device under cuda, else cpu."""
    import torch

    if provider == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def measure(args: argparse.Namespace, nproc: int, scales: Path) -> dict:
    """Run ``nproc`` ranks under torchrun; rank 0's time, every rank's device, the scales file."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", __file__, "--worker", "--method", args.method]
    command += ["--provider", args.provider, "--num-calib", str(args.num_calib)]
    command += ["--scales", str(scales)]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(REPO))
    if done.returncode != 0:
        raise SystemExit(f"{nproc} processes failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    ranks = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    first = next(r for r in ranks if r["rank"] == 0)
    devices = ", ".join(r["device"] for r in sorted(ranks, key=lambda r: r["rank"]))
    return {**first, "devices": devices, "scales": scales}


def same_scales(one: Path, other: Path) -> str:
    """ "equal" if every tensor's amax and scale are bit-identical, else the largest relative
    difference of the scales and how many tensors differ."""
    import torch

    from qcal_export.artifacts.scales import load_scales

    ours, theirs = load_scales(one)[0], load_scales(other)[0]
    if ours.keys() != theirs.keys():
        return "different tensors"
    differ = [
        t
        for t, s in ours.items()
        if not (torch.equal(s.amax, theirs[t].amax) and torch.equal(s.scale, theirs[t].scale))
    ]
    if not differ:
        return "equal"
    worst = max(
        float(((ours[t].scale - theirs[t].scale).abs() / ours[t].scale.abs()).max()) for t in differ
    )
    return f"{len(differ)} of {len(ours)} differ (max rel {worst:.2e})"


def _gpus(args: argparse.Namespace) -> str:
    if args.provider != "cuda":
        return "no GPU used"
    import torch

    names = [torch.cuda.get_device_name(i) for i in range(max(args.nproc))]
    return "GPUs: " + ", ".join(f"{i}: {n}" for i, n in enumerate(names))


def check_gpus(provider: str, nprocs: list[int]) -> None:
    """Under cuda: a GPU for each process of the largest configuration, and the CUDA EP."""
    if provider != "cuda":
        return
    import onnxruntime
    import torch

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise SystemExit("--provider cuda: this onnxruntime has no CUDAExecutionProvider")
    if torch.cuda.device_count() < max(nprocs):
        raise SystemExit(
            f"--provider cuda with {max(nprocs)} processes needs as many GPUs; "
            f"{torch.cuda.device_count()} visible"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--method", default="max")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--num-calib", type=int, default=256)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scales", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    check_gpus(args.provider, args.nproc)
    with tempfile.TemporaryDirectory(prefix="qcal-dist-") as tmp:
        rows = {n: measure(args, n, Path(tmp) / f"scales{n}.safetensors") for n in args.nproc}
        first = rows[args.nproc[0]]["scales"]
        for row in rows.values():
            row["same"] = same_scales(first, row["scales"])
    base = rows[args.nproc[0]]["seconds"]
    lines = [
        f"# Distributed calibration throughput ({args.provider}, method {args.method})",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; {os.cpu_count()} cores",
        f"- versions: {', '.join(f'{k} {v}' for k, v in harness.versions().items())}",
        f"- demo model, {args.num_calib} calibration texts in batches of 16; {_gpus(args)}",
        "",
        f"| processes | seconds | samples/s | speed-up | devices (rank order) "
        f"| scales vs {args.nproc[0]} process(es) |",
        "| ---: | ---: | ---: | ---: | --- | --- |",
        *(
            f"| {n} | {r['seconds']:.2f} | {r['samples'] / r['seconds']:.1f} "
            f"| {base / r['seconds']:.2f}x | {r['devices']} | {r['same']} |"
            for n, r in rows.items()
        ),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / f"distributed_{args.provider}.md").write_text(text)


if __name__ == "__main__":
    main()
