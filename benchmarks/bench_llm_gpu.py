"""The ~1B LLM calibrated end to end on one GPU: ours vs ORT quantize_static, per-phase times.

Builds (or reuses) the seeded Llama of ``benchmarks/llm_model.py`` at ``--size`` and
``--dtype``, then runs each row in a fresh process on the same seeded token batches
(``--sequences`` of ``--seq`` tokens in batches of ``--batch``): ours (``calibrate_onnx``, int8
max / percentile / entropy / mse, NVFP4 nvfp4-mse + Hessian with ModelOpt and
compressed-tensors checkpoints, FP8) and ORT's ``quantize_static`` (MinMax / Percentile /
Entropy, QDQ, per channel, MatMul/Gemm, external data) with ``--provider``'s execution provider.
Per row: the call's wall time and samples/s, the child's peak RSS (and its ratio to the model's
bytes), the GPU's peak used memory, and for ours a per-phase table. ORT's Percentile/Entropy
hold every batch's MatMul activations in host memory, so the histogram rows (ours and ORT's)
run on the first ``--hist-sequences`` (default: what fits in half the host's memory).

Results go to ``$OUT`` (else benchmarks/results) as ``<name>.md`` and ``<name>.json``
(``llm_gpu`` for cuda, else ``llm_<provider>_<size>``). The run is resumable: rows already in
the JSON are kept (``--force`` measures them again), so a device with a 10-minute command
limit runs it in several calls, each measuring the rows it has time for (``--budget-s``):

    python benchmarks/bench_llm_gpu.py --build-only           # call 1: export the 1b model
    python benchmarks/bench_llm_gpu.py                        # calls 2..: the rows left, in order
    python benchmarks/bench_llm_gpu.py --rows ours-max,ort-minmax [--torch-profile]
    python benchmarks/bench_llm_gpu.py --provider cpu --size small --sequences 16 --seq 128

The order of calls on one H100/H200 (``bash benchmarks/run_gpu.sh llm`` runs one call within
570 s; repeat it until it prints "all rows done"; the estimate of each row's time, from the
small model measured on the CPU, is in benchmarks/results/llm_cpu_small.md). The host-side
phases (load, checker, pre-process, plan, shape inference, session, export) scale with the
parameters and dominate; the capture runs on the GPU. Call 1: the export (the call then
stops). Call 2: ours-max and ort-minmax, the headline pair. Call 3: ours-fp8, then
ours-percentile. Further calls: ort-percentile, ours-entropy, ort-entropy, ours-mse on the
histogram data; ours-nvfp4 last, as its nvfp4-mse weight sweep runs on the host
(``calibrate_weights`` takes the initializers on the CPU) and is expected to reach the row
timeout at 1b. A row cut by the call's budget is not recorded and runs again in the next call;
one that exceeds ``--row-timeout`` on its own is recorded as a timeout; a call does not start
a row expected (from the rows measured) to overrun what is left of it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import harness
import llm_gpu_report
import llm_model
import llm_rows
from row_process import GpuMemory, watch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HERE = Path(__file__).resolve()
MIN_ROW_S = 60.0
SETTINGS = ("size", "dtype", "sequences", "seq", "batch", "hist_sequences", "provider")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(llm_model.SIZES), default="1b")
    parser.add_argument("--dtype", choices=sorted(llm_model.TOLERANCE), default="float32")
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument(
        "--hist-sequences",
        type=int,
        default=None,
        help="sequences of the histogram rows (default: what ORT can hold in half the RAM)",
    )
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument(
        "--rows", default="all", help=f"comma-separated subset of {','.join(llm_rows.ROWS)}"
    )
    parser.add_argument("--build-only", action="store_true", help="export the model and stop")
    parser.add_argument("--force", action="store_true", help="measure rows already recorded")
    parser.add_argument("--torch-profile", action="store_true", help="profile one ours-max run")
    parser.add_argument("--budget-s", type=float, default=540.0, help="this call's time (0: any)")
    parser.add_argument("--row-timeout", type=float, default=540.0)
    parser.add_argument(
        "--work", type=Path, default=Path(os.environ.get("QCAL_LLM_WORK", "/tmp/qcal-llm"))
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="default: $OUT or results/")
    parser.add_argument("--name", default=None, help="result file stem")
    parser.add_argument("--keep-outputs", action="store_true", help="keep each row's files")
    # Internal: one row in this process.
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--profile-table", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR
    if args.name is None:
        args.name = "llm_gpu" if args.provider == "cuda" else f"llm_{args.provider}_{args.size}"
    return args


def selected_rows(spec: str, profile: bool) -> list[str]:
    names = list(llm_rows.ROWS) if spec == "all" else [r for r in spec.split(",") if r]
    unknown = [r for r in names if r not in llm_rows.ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: choose from {','.join(llm_rows.ROWS)}")
    return names + ([llm_rows.PROFILE_ROW] if profile else [])


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def model_path(args: argparse.Namespace) -> Path:
    return args.work / f"{args.size}-{args.dtype}" / llm_model.MODEL_NAME


def build_model(args: argparse.Namespace, gpu: GpuMemory, budget: float) -> dict[str, Any]:
    """Export the model in a child process unless a finished export is there; its record
    (``now``: whether this call exported it)."""
    path = model_path(args)
    done = path.parent / "built.json"
    if done.is_file():
        return {**json.loads(done.read_text()), "now": False}
    need = llm_model.parameter_count(args.size) * (2 if args.dtype == "float16" else 4) * 2.2
    args.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.work).free
    if free < need:
        raise SystemExit(
            f"{args.work}: {free / 2**30:.1f} GiB free, the export needs ~{need / 2**30:.1f}"
        )
    shutil.rmtree(path.parent, ignore_errors=True)
    path.parent.mkdir(parents=True)
    command = [sys.executable, str(HERE.parent / "llm_model.py"), "--size", args.size]
    command += ["--out", str(path.parent), "--dtype", args.dtype, "--batches", "0"]
    watched = watch(command, args.work / "build.log", budget, gpu)
    failure = watched.failure(budget)
    if failure:
        raise SystemExit(f"model export failed: {failure}\n{watched.log_tail}")
    record = {
        "seconds": watched.seconds,
        "peak_rss_mib": watched.peak_rss_mib,
        "bytes": sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*")),
    }
    done.write_text(json.dumps(record))
    return {**record, "now": True}


def check_provider(provider: str) -> None:
    """Stop before anything runs when ORT lacks the provider's execution provider."""
    import onnxruntime

    wanted = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[provider]
    if wanted not in onnxruntime.get_available_providers():
        raise SystemExit(
            f"--provider {provider}: {onnxruntime.__file__} offers "
            f"{onnxruntime.get_available_providers()}; put onnxruntime-gpu first on PYTHONPATH"
        )


def hist_sequences(args: argparse.Namespace) -> tuple[int, int, str]:
    """(histogram rows' sequences, ORT's estimated host bytes a sequence, why that count)."""
    per_sequence = llm_rows.ort_histogram_bytes_per_sequence(args.size, args.seq, args.dtype)
    if args.hist_sequences is not None:
        return min(args.hist_sequences, args.sequences), per_sequence, "--hist-sequences"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fits = int(memory / 2 // per_sequence) // args.batch * args.batch
    count = max(args.batch, min(fits, args.sequences))
    why = f"the most whole batches within half the host's {memory / 2**30:.0f} GiB"
    return count, per_sequence, why


# --------------------------------------------------------------------------------------------
# Rows and the results file
# --------------------------------------------------------------------------------------------


def environment(gpu: GpuMemory) -> dict[str, Any]:
    import onnxruntime
    import transformers

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": gpu.name(),
        "host": f"{platform.node()}, {os.cpu_count()} logical cores",
        "versions": {**harness.versions(), "transformers": transformers.__version__},
        "ort_providers": onnxruntime.get_available_providers(),
        "onnxruntime_path": str(Path(onnxruntime.__file__).parent),
    }


def load_results(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON so far (rows kept) if it has these settings, else a fresh one."""
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("settings", {}).get("key") == settings["key"]:
            return old
        print(f"{path}: other settings ({old.get('settings')}): starting afresh")
    return {"settings": settings, "rows": {}}


def run_one(name: str, args: argparse.Namespace, gpu: GpuMemory, timeout: float) -> dict | None:
    """Measure row ``name`` in a child; its record, or None if the call's budget cut it."""
    work = args.work / "rows"
    shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    result_json = work / f"{name}.json"
    result_json.unlink(missing_ok=True)
    command = [sys.executable, str(HERE), "--row", name, "--model", str(model_path(args))]
    for key in ("size", "dtype", "sequences", "seq", "batch", "hist_sequences", "provider"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    command += ["--device-id", str(args.device_id), "--work-dir", str(work)]
    command += ["--json", str(result_json)]
    profile = args.out_dir / f"{args.name}_torch_profile.txt"
    command += ["--profile-table", str(profile)]
    watched = watch(command, work / f"{name}.log", timeout, gpu)
    if not args.keep_outputs:
        shutil.rmtree(work / name, ignore_errors=True)
    failure = watched.failure(timeout)
    if watched.timed_out and timeout < args.row_timeout:
        return None
    if failure:
        return {"row": name, "error": failure, "log_tail": watched.log_tail, **watched.to_dict()}
    return {**json.loads(result_json.read_text()), **watched.to_dict()}


def expected_seconds(name: str, rows: dict[str, Any]) -> float:
    """A row's likely time: the longest recorded row of the same side (ours / ORT), 0 if none.
    A call that has already measured a row does not start one expected to overrun it."""
    who = llm_rows.ROWS.get(name, llm_rows.ROWS["ours-max"]).who
    times = [r["process_s"] for r in rows.values() if r.get("who") == who and "error" not in r]
    return max(times, default=0.0)


def summary(record: dict[str, Any]) -> str:
    if "error" in record:
        return record["error"]
    return (
        f"{record['call_s']:.1f} s, {record['samples_per_s']:.2f} samples/s, "
        f"peak RSS {record['peak_rss_mib']:.0f} MiB"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.row:
        llm_rows.write_row(args)
        return 0
    start = time.perf_counter()
    budget = args.budget_s or float("inf")
    gpu = GpuMemory(args.device_id)
    names = selected_rows(args.rows, args.torch_profile)
    if not args.build_only:
        check_provider(args.provider)
    build = build_model(args, gpu, budget)
    gib = build["bytes"] / 2**30
    print(f"model {model_path(args)}: exported in {build['seconds']:.0f} s, {gib:.2f} GiB")
    exported_now = build.pop("now")
    if args.build_only:
        return 0
    if exported_now and args.budget_s:
        print("model exported in this call: the rows run in the next ones")
        return 0
    args.hist_sequences, per_sequence, why = hist_sequences(args)
    settings = {k: getattr(args, k) for k in SETTINGS}
    settings |= {"ort_hist_bytes_per_sequence": per_sequence, "hist_sequences_source": why}
    settings["key"] = json.dumps({k: settings[k] for k in SETTINGS})
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"{args.name}.json"
    results = load_results(json_path, settings)
    results |= {"environment": environment(gpu), "build": build}
    results["model"] = {
        "parameters": llm_model.parameter_count(args.size),
        "bytes": build["bytes"],
    }
    todo = [n for n in names if args.force or n not in results["rows"]]
    for name in todo:
        left = budget - (time.perf_counter() - start)
        guess = expected_seconds(name, results["rows"])
        if left < MIN_ROW_S or (guess > left and time.perf_counter() - start > MIN_ROW_S):
            print(f"== {name}: {left:.0f} s left in this call, expected ~{guess:.0f} s: next call")
            break
        print(f"== {name} (timeout {min(args.row_timeout, left):.0f} s)", flush=True)
        record = run_one(name, args, gpu, min(args.row_timeout, left))
        if record is None:
            print("   cut by this call's budget: runs again in the next call")
            break
        results["rows"][name] = record
        print("   " + summary(record))
        if name == llm_rows.PROFILE_ROW and "error" not in record:
            results["profile_table"] = f"{args.name}_torch_profile.txt"
        json_path.write_text(json.dumps(results, indent=1))
        (args.out_dir / f"{args.name}.md").write_text(llm_gpu_report.render(results))
    left_rows = [n for n in names if n not in results["rows"]]
    json_path.write_text(json.dumps(results, indent=1))
    (args.out_dir / f"{args.name}.md").write_text(llm_gpu_report.render(results))
    print(f"rows left: {','.join(left_rows)}" if left_rows else "all rows done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
