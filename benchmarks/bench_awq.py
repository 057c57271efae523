"""Weight-only int4 on the demo model: round-to-nearest max, qcal's awq (and awq with its clip
search), and Model Optimizer's ONNX int4 ``awq_lite`` and ``awq_clip``, on the same data.

Per block size (32, 128) and row: mean and min cosine of the sentence embeddings against the
float model on the 128 held-out demo texts, and the wall time of the quantization. Every method
calibrates on the same 256 texts (16 batches of 16), padded to one length because Model
Optimizer concatenates the batches' activations. A row that fails records its error. Not a test;
run it by hand:

    PYTHONPATH=. python benchmarks/bench_awq.py [--blocks 32 128] [--rows max awq ...]
        [--output F]

The table is printed and written to ``benchmarks/results/weight_4bit_awq.md`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import onnx
import onnx.version_converter

from qcal_export.demo.evaluate import embedding_cosine
from qcal_export.demo.model import demo_model_path
from qcal_export.demo.texts import demo_batches, demo_texts
from qcal_export.pipeline.calibrate import calibrate_onnx

RESULT_FILE = Path(__file__).resolve().parent / "results" / "weight_4bit_awq.md"
ROWS = {
    "max": ("qcal max (RTN)", "qcal", "max", {}),
    "awq": ("qcal awq", "qcal", "awq", {}),
    "awq-clip": ("qcal awq, clip", "qcal", "awq", {"clip": 1}),
    "awq_lite": ("modelopt awq_lite", "modelopt", "awq_lite", {}),
    "awq_clip": ("modelopt awq_clip", "modelopt", "awq_clip", {}),
}
"""Per row key: label, tool, method and options."""


def padded(batches: list[dict]) -> list[dict]:
    """The batches padded (token 0, mask 0) to the longest one's length."""
    length = max(b["input_ids"].shape[1] for b in batches)
    return [
        {k: np.pad(v, ((0, 0), (0, length - v.shape[1]))) for k, v in b.items()} for b in batches
    ]


def qcal_row(model: Path, calib: list, out: Path, block: int, method: str, options: dict) -> None:
    calibrate_onnx(
        model,
        calib,
        output=out,
        format="int4",
        activation_format="none",
        weight_method=method,
        block_size=block,
        validate_batches=0,
        method_options=options or None,
    )


def modelopt_row(model: Path, calib: list, out: Path, block: int, method: str) -> None:
    from modelopt.onnx.quantization import int4
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self, batches: list[dict]):
            self.batches = iter(batches)

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    # int4.quantize writes DequantizeLinear with block_size (opset 21) into the model's own
    # opset (17 here), which ONNX Runtime refuses: it gets the model converted to 21 first, as
    # qcal converts it before planning int4.
    upgraded = out.with_name("opset21.onnx")
    onnx.save(onnx.version_converter.convert_version(onnx.load(model), 21), upgraded)
    quantized = int4.quantize(
        str(upgraded),
        calibration_method=method,
        calibration_data_reader=Reader(calib),
        calibration_eps=["cpu"],
        block_size=block,
        use_external_data_format=False,
        nodes_to_exclude=[],
        log_level="WARNING",
    )
    onnx.save(quantized, out)


def run_row(row: tuple, block: int, model: Path, calib: list, heldout: list, out: Path) -> str:
    label, tool, method, options = row
    start = time.perf_counter()
    try:
        if tool == "qcal":
            qcal_row(model, calib, out, block, method, options)
        else:
            modelopt_row(model, calib, out, block, method)
    except Exception as e:  # a peer that fails on this machine is a result, recorded
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"| {label} | failed: {type(e).__name__}: {first} | | |"
    seconds = time.perf_counter() - start
    score = embedding_cosine(model, out, heldout)
    return f"| {label} | {score['mean']:.5f} | {score['min']:.5f} | {seconds:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", nargs="*", type=int, default=[32, 128])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--output", type=Path, default=RESULT_FILE, help="the table's file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = demo_model_path()
    calib_texts, heldout_texts = demo_texts(256, 128)
    calib = padded(demo_batches(calib_texts, batch_size=16))
    heldout = demo_batches(heldout_texts, batch_size=16)
    lines = [
        "# Weight-only int4 with AWQ on the demo model (all-MiniLM-L6-v2)",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; {os.cpu_count()} cores; "
        "ONNX Runtime CPU EP",
        f"- versions: {', '.join(f'{k} {v}' for k, v in harness.versions().items())}, "
        f"modelopt {_modelopt_version()}",
        f"- 256 calibration texts (16 batches of 16, padded to {calib[0]['input_ids'].shape[1]} "
        "tokens), 128 held-out texts; every MatMul weight int4 symmetric in blocks along the "
        "input channels, activations float; cosine of the sentence embeddings vs the float "
        "model",
        "- qcal awq: per shared input, alpha on 20 points of [0, 1], factors mean|x|^alpha, "
        "error on at most 512 sampled rows; clip: per block ratios 1 to 0.55. Model Optimizer: "
        "awq_lite (alpha step 0.1, factors from activation and weight means), awq_clip (per "
        "block clip ratio 0.5 to 1, no scaling)",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        for block in args.blocks:
            lines += [
                f"## Blocks of {block}",
                "",
                "| method | mean cosine | min cosine | time (s) |",
                "| --- | ---: | ---: | ---: |",
            ]
            for row in (ROWS[key] for key in args.rows):
                line = run_row(row, block, model, calib, heldout, out)
                lines.append(line)
                print(line, flush=True)
            lines.append("")
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


def _modelopt_version() -> str:
    try:
        import modelopt
    except ImportError as e:
        return f"not importable ({e})"
    return modelopt.__version__


if __name__ == "__main__":
    main()
