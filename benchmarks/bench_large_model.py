"""A model over 2 GB (external data) calibrates and exports with its external data: peak memory.

Builds a synthetic MLP of ``--layers`` MatMuls with float32 ``[hidden, hidden]`` weights (9 x
8192 x 8192: 2.25 GiB, past protobuf's 2 GiB limit) saved with external data, then, each in a
fresh process, calibrates and exports it with ``calibrate_onnx`` (int8 W8A8, per-channel
weights, max) and with ONNX Runtime's ``quantize_static`` (MinMax, QDQ, external data) on the
same batches. Per row: wall time, peak RSS and its ratio to the float model's size, and the
files written. Not a test; run it by hand (about 3 minutes and 12 GB of disk on 2 cores):

    python benchmarks/bench_large_model.py [--layers 9] [--hidden 8192] [--batches 4]

The table is printed and written to ``benchmarks/results/large_model.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

RESULT_FILE = Path(__file__).resolve().parent / "results" / "large_model.md"
ROWS = ("qcal", "ort")
BATCH = 4


def build_model(path: Path, layers: int, hidden: int) -> int:
    """Save the MLP (MatMul -> Relu per layer) with its weights as external data; its bytes."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, weights, source = [], [], "x"
    for i in range(layers):
        rng = np.random.default_rng(i)
        w = (rng.standard_normal((hidden, hidden), dtype=np.float32) / np.sqrt(hidden)).astype(
            np.float32
        )
        weights.append(numpy_helper.from_array(w, f"layer{i}.weight"))
        del w
        nodes.append(helper.make_node("MatMul", [source, f"layer{i}.weight"], [f"mm{i}"]))
        out = "y" if i == layers - 1 else f"act{i}"
        nodes.append(helper.make_node("Relu", [f"mm{i}"], [out]))
        source = out
    graph = helper.make_graph(
        nodes,
        "large_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", hidden])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    return sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*"))


def batches(count: int, hidden: int) -> list[dict[str, Any]]:
    import numpy as np

    rng = np.random.default_rng(1234)
    return [{"x": rng.standard_normal((BATCH, hidden), dtype=np.float32)} for _ in range(count)]


def peak_rss_mib() -> float:
    """This process's peak resident set size, MiB: VmHWM, not ``ru_maxrss``, which a child
    inherits from its parent across fork and exec (here the parent that built the model)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def run_row(args: argparse.Namespace) -> dict[str, Any]:
    """One measured row, in this (fresh) process."""
    model = Path(args.model)
    out_dir = Path(args.work_dir) / args.row
    out_dir.mkdir()
    data = batches(args.batches, args.hidden)
    baseline = peak_rss_mib()
    start = time.perf_counter()
    if args.row == "qcal":
        from qcal_export import calibrate_onnx

        result = calibrate_onnx(
            model, data, output=out_dir / "q.onnx", format="int8", validate_batches=1
        )
        extra = {"output error (rel L2)": result.report["output_error"]["y"]["rel_l2"]}
    else:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(data)

            def get_next(self) -> dict[str, Any] | None:
                return next(self.it, None)

        quantize_static(
            str(model),
            str(out_dir / "q.onnx"),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            use_external_data_format=True,
        )
        extra = {}
    seconds = time.perf_counter() - start
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    return {
        "row": args.row,
        "seconds": seconds,
        "baseline_mib": baseline,
        "peak_mib": peak_rss_mib(),
        "files": files,
        **extra,
    }


def render(rows: list[dict[str, Any]], model_bytes: int, args: argparse.Namespace) -> str:
    model_mib = model_bytes / 2**20
    lines = [
        "# A model over 2 GB: calibrate and export with external data",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- versions: {json.dumps(harness.versions())}",
        f"- CPU: {os.cpu_count()} logical cores; 1-min load average {os.getloadavg()[0]:.1f}",
        f"- model: {args.layers} x MatMul [{args.hidden}, {args.hidden}] float32 + Relu, "
        f"{model_mib:.0f} MiB (external data); {args.batches} batches of [{BATCH}, {args.hidden}]",
        "- qcal: calibrate_onnx(format='int8', method='max', per-channel weights, 1 batch of "
        "validation against the float model); ORT: quantize_static(MinMax, QDQ, per_channel, "
        "use_external_data_format=True)",
        "- peak RSS: the row process's VmHWM (`ru_maxrss` counted the parent's peak while it "
        "built the model: the table of 2026-11-23 showed that for both rows)",
        "",
        "| row | wall time (s) | peak RSS (MiB) | peak RSS / model size | files written |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error'][:200]} | | | |")
            continue
        files = ", ".join(f"{n} ({s / 2**20:.0f} MiB)" for n, s in r["files"].items())
        lines.append(
            f"| {r['row']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | "
            f"{r['peak_mib'] / model_mib:.2f} | {files} |"
        )
    qcal = next((r for r in rows if r["row"] == "qcal" and "error" not in r), None)
    if qcal is not None:
        lines += ["", f"qcal output error vs float (rel L2): {qcal['output error (rel L2)']:.4f}"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--output", type=Path, default=RESULT_FILE)
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.row:
        Path(args.json).write_text(json.dumps(run_row(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="qcal-bench-large-") as tmp:
        work = Path(tmp)
        model = work / "float" / "large.onnx"
        model.parent.mkdir()
        model_bytes = build_model(model, args.layers, args.hidden)
        common = ["--layers", str(args.layers), "--hidden", str(args.hidden)]
        common += ["--batches", str(args.batches), "--model", str(model), "--work-dir", tmp]
        rows = [
            harness.spawn_row(__file__, [*common, "--row", row], work / f"{row}.json", {"row": row})
            for row in args.rows
        ]
    text = render(rows, model_bytes, args)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
