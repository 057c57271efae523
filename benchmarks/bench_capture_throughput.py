"""End-to-end calibration throughput (samples/s): ours vs ``quantize_static`` on one provider.

Calibrates all-MiniLM-L6-v2 (the demo ONNX export) on the demo calibration texts with
``calibrate_onnx`` (int8, activation method max / percentile / entropy / mse, per-channel int8
weights) and with ``onnxruntime.quantization.quantize_static`` (QDQ, QInt8, MinMax / Percentile /
Entropy), both capturing with the same execution provider (``--provider cpu`` or ``cuda``), both
over MatMul and Gemm. Under the CUDA EP ours keeps the captured activations on the GPU
(IOBinding + DLPack) and calibrates them there; ORT's calibrators fetch them to the host as
numpy. The ``ours-*-hostcopy`` rows run ours with the captured tensors copied to the host, to
show what device-resident capture is worth.

Two times per row, each the median of ``--repeats`` calls after one untimed warm-up call on two
batches (CUDA context, libraries): the calibration part (ours: ``timings['calibrate_s']``, the
capture session and every pass plus the weights; ORT: from ``create_calibrator`` to the end of
``compute_data`` inside ``quantize_static``, i.e. augmenting the graph, its session and the
calibrator) and the whole call that writes the QDQ model. Every row runs in its own process.
Not a test; run it by hand:

    python benchmarks/bench_capture_throughput.py [--provider cpu|cuda] [--device-id 0]
        [--num-calib 256] [--batch-size 16] [--repeat-data 1] [--repeats 3] [--methods ...]
        [--add]

The table is printed and written to ``$OUT/capture_throughput_<provider>.md`` when ``OUT`` is
set, else to ``benchmarks/results/capture_throughput_<provider>.md``; the rows' numbers go to
the same name with ``.json``. ``--add`` keeps the rows of that file that this run does not
measure (same settings only), so a long table can be measured in several runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import ort_static_rows
from capture_throughput_report import render

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# row -> (our method, capture with IOBinding: None = the default for the provider, False = host)
OURS = {
    "ours-max": ("max", None),
    "ours-percentile": ("percentile", None),
    "ours-entropy": ("entropy", None),
    "ours-mse": ("mse", None),
    "ours-max-hostcopy": ("max", False),
    "ours-entropy-hostcopy": ("entropy", False),
}
ORT = {"ort-minmax": "MinMax", "ort-percentile": "Percentile", "ort-entropy": "Entropy"}
METHODS = (*OURS, *ORT)
HOSTCOPY = ("ours-max-hostcopy", "ours-entropy-hostcopy")
SAME_METHOD = {"max": "ort-minmax", "percentile": "ort-percentile", "entropy": "ort-entropy"}
PEERS = {row: SAME_METHOD[m] for row, (m, _) in OURS.items() if m in SAME_METHOD}
"""Each of our rows and ORT's row of the same method."""


def default_output(provider: str) -> Path:
    out = os.environ.get("OUT")
    directory = Path(out) if out else RESULTS_DIR
    return directory / f"capture_throughput_{provider}.md"


# --------------------------------------------------------------------------------------------
# One row, in a fresh process
# --------------------------------------------------------------------------------------------


def _ours(args: argparse.Namespace, batches: list[dict], output: Path) -> tuple[float, float, str]:
    """One calibrate_onnx call: (calibration s, whole call s, where calibrators got tensors)."""
    from qcal_export import pipeline
    from qcal_export.capture.onnxruntime import OrtCapture

    method, iobinding = OURS[args.row]
    devices: list[str] = []

    class Capture(OrtCapture):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw, **({} if iobinding is None else {"iobinding": iobinding}))
            devices.append(str(self.device))

    pipeline.OrtCapture = Capture
    model = demo_model()
    start = time.perf_counter()
    result = pipeline.calibrate_onnx(
        model,
        batches,
        output=output,
        format="int8",
        method=method,
        weight_method="max",
        per_channel_weights=True,
        validate_batches=0,  # quantize_static does not re-run the model either
        provider=args.provider,
        device_id=args.device_id,
    )
    whole = time.perf_counter() - start
    return result.timings["calibrate_s"], whole, ",".join(devices)


def _ort(args: argparse.Namespace, batches: list[dict], output: Path) -> tuple[float, float, str]:
    """One quantize_static call: (calibration s, whole call s, the calibration providers)."""
    import importlib

    from qcal_export.capture.iobinding import bind_device_id
    from qcal_export.capture.onnxruntime import select_providers

    # the module, not the function ``onnxruntime.quantization.quantize`` that shadows it
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
    providers = bind_device_id(select_providers(args.provider), args.device_id)
    first = providers[0] if isinstance(providers[0], str) else providers[0][0]
    create = ort_quantize.create_calibrator
    marks: dict[str, float] = {}

    def timed_create(*a: Any, **kw: Any) -> Any:
        marks["start"] = time.perf_counter()
        calibrator = create(*a, **kw)
        compute = calibrator.compute_data

        def timed_compute() -> Any:
            found = compute()
            marks["end"] = time.perf_counter()
            return found

        calibrator.compute_data = timed_compute
        return calibrator

    ort_quantize.create_calibrator = timed_create
    start = time.perf_counter()
    try:
        ort_static_rows.calibrate_ort(
            demo_model(),
            batches,
            ORT[args.row],
            output,
            preprocess=False,
            symmetric=True,
            quantize_outputs=False,
            providers=providers,
        )
    finally:
        ort_quantize.create_calibrator = create
    whole = time.perf_counter() - start
    return marks["end"] - marks["start"], whole, first


def demo_model() -> Path:
    from qcal_export.demo import demo_model_path

    return demo_model_path()


def calibration_batches(args: argparse.Namespace) -> list[dict]:
    """The demo calibration texts, tokenized and padded to the longest, ``repeat_data`` times."""
    from qcal_export.demo import demo_batches, demo_texts

    texts, _ = demo_texts(args.num_calib, 0)
    batches = demo_batches(texts, batch_size=args.batch_size)
    longest = max(b["input_ids"].shape[1] for b in batches)
    return ort_static_rows.pad_to(batches, longest) * args.repeat_data


def run_row(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up once on two batches, then time ``repeats`` calibrations; medians and samples/s."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    batches = calibration_batches(args)
    samples = sum(b["input_ids"].shape[0] for b in batches)
    call = _ours if args.row in OURS else _ort
    calib, whole = [], []
    with tempfile.TemporaryDirectory(prefix="qcal-throughput-") as tmp:
        output = Path(tmp) / "model.qdq.onnx"
        call(args, batches[:2], output)
        for _ in range(args.repeats):
            calib_s, whole_s, device = call(args, batches, output)
            calib.append(calib_s)
            whole.append(whole_s)
    calib_s, whole_s = statistics.median(calib), statistics.median(whole)
    return {
        "method": args.row,
        "samples": samples,
        "batches": len(batches),
        "seq_len": int(batches[0]["input_ids"].shape[1]),
        "calib_s": calib_s,
        "whole_s": whole_s,
        "calib_sps": samples / calib_s,
        "whole_sps": samples / whole_s,
        "calib_all": calib,
        "whole_all": whole,
        "device": device,
        "peak_mib": harness.peak_rss_mib(),
    }


def spawn_row(method: str, args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    argv = ["--row", method, "--provider", args.provider, "--device-id", str(args.device_id)]
    argv += ["--num-calib", str(args.num_calib), "--batch-size", str(args.batch_size)]
    argv += ["--repeat-data", str(args.repeat_data), "--repeats", str(args.repeats)]
    return harness.spawn_row(__file__, argv, work_dir / f"{method}.json", {"method": method})


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What rows must share to sit in one table."""
    keys = ("provider", "device_id", "num_calib", "batch_size", "repeat_data", "repeats")
    return {k: getattr(args, k) for k in keys}


def earlier_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """With ``--add``, the rows of the earlier run's .json (which must share our settings)."""
    path = args.output.with_suffix(".json")
    if not (args.add and path.is_file()):
        return []
    earlier = json.loads(path.read_text())
    if earlier["settings"] != settings(args):
        raise SystemExit(
            f"--add: {path} was measured with {earlier['settings']}, this run asks for "
            f"{settings(args)}; use the same options or another --output"
        )
    return earlier["rows"]


def merge_rows(
    rows: list[dict[str, Any]], earlier: list[dict[str, Any]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """This run's rows and the earlier ones it did not measure, in table order; saved as the
    .json beside the markdown."""
    measured = {r["method"]: r for r in rows}
    for row in earlier:
        measured.setdefault(row["method"], row)
    merged = [measured[m] for m in METHODS if m in measured]
    path = args.output.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings(args), "rows": merged}, indent=1) + "\n")
    return merged


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--device-id", type=int, default=0, help="GPU for the CUDA EP")
    parser.add_argument("--num-calib", type=int, default=256, help="demo calibration texts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--repeat-data", type=int, default=1, help="pass the calibration batches N times over"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row (median)")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        help="rows to run (default: all; the hostcopy rows only with --provider cuda)",
    )
    parser.add_argument("--output", type=Path, help="markdown result file")
    parser.add_argument(
        "--add",
        action="store_true",
        help="keep the rows of the earlier run's .json that this run does not measure",
    )
    # Internal: one row in this process.
    parser.add_argument("--row", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.methods is None:
        args.methods = [m for m in METHODS if args.provider == "cuda" or m not in HOSTCOPY]
    if args.output is None:
        args.output = default_output(args.provider)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.row:
        Path(args.json).write_text(json.dumps(run_row(args)))
        return 0
    earlier = earlier_rows(args)
    print(f"demo model: {demo_model()}")  # exported once here, not inside a timed row
    args.load_before = os.getloadavg()[0]
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qcal-bench-") as tmp:
        for method in args.methods:
            print(f"{method} ...", end=" ", flush=True)
            row = spawn_row(method, args, Path(tmp))
            rows.append(row)
            if "error" in row:
                print("failed", flush=True)
            else:
                print(
                    f"calib {row['calib_s']:.2f} s ({row['calib_sps']:.0f} samples/s), "
                    f"whole {row['whole_s']:.2f} s, on {row['device']}",
                    flush=True,
                )
    args.load_after = os.getloadavg()[0]
    rows = merge_rows(rows, earlier, args)
    report = render(rows, args, time.perf_counter() - start, PEERS)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)
    print(f"written to {args.output}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
