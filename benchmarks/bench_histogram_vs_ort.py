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
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import ort_static_rows
from histogram_vs_ort_report import render

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
    from qcal_export.spec.formats import INT8
    from qcal_export.spec.granularity import PerTensor

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
