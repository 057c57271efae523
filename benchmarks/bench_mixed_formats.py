"""Mixed-format precision search on the demo model, beside each format alone, scored on the
held-out texts.

Each row is ``FORMATS[@TARGET]`` (``nvfp4,fp8,int8@0.99``: ``--formats nvfp4,fp8,int8
--target-cosine 0.99``; ``nvfp4``: the format alone, no search). Every row places Q/DQ as
TensorRT does (``--target tensorrt``: the MatMul inputs), activations and weights with max.
Per row: mean and min cosine of the sentence embeddings against the float model on the 128
held-out texts, the target's own held-out split figure, bits per weight and per activation
(weighted by element counts; block scales included), how many units took each format, and the
wall time of the calibration with its phases under the table. Not a test; run it by hand:

    python benchmarks/bench_mixed_formats.py [--rows nvfp4 nvfp4,fp8,int8@0.99 ...] [--output F]

The table is printed and written to ``benchmarks/results/mixed_formats.md`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import harness

from qcal_export.demo.evaluate import embedding_cosine
from qcal_export.demo.model import demo_model_path
from qcal_export.demo.texts import demo_batches, demo_texts
from qcal_export.pipeline.calibrate import calibrate_onnx

RESULT_FILE = Path(__file__).resolve().parent / "results" / "mixed_formats.md"
ROWS = ("nvfp4,fp8,int8@0.99", "nvfp4", "fp8", "int8", "nvfp4,int8@0.99")
ALONE_BITS = {"nvfp4": 4 + 8 / 16, "fp8": 8.0, "int8": 8.0}
"""Bits per element of a format alone (NVFP4: E2M1 and an E4M3 scale per 16)."""


def run_row(
    text: str, model: Path, calib: list, heldout: list, out: Path, view_batches: int
) -> tuple[str, dict]:
    formats, _, target = text.partition("@")
    options = {}
    if target:
        options = {"formats": formats, "target_cosine": float(target), "view_batches": view_batches}
    start = time.perf_counter()
    result = calibrate_onnx(
        model,
        calib,
        output=out,
        format=formats.split(",")[0],
        target="tensorrt",
        validate_batches=0,
        **options,
    )
    seconds = time.perf_counter() - start
    score = embedding_cosine(model, out, heldout)
    mixed = result.report.get("mixed_formats")
    if mixed:
        bits = mixed["bits"]
        weight, activation = bits["per_weight"], bits["per_activation"]
        counts = Counter(row["format"] for row in mixed["units"])
        spread = ", ".join(f"{f} {counts[f]}" for f in mixed["formats"] if counts[f])
        split = f"{mixed['heldout_exported']['cosine']:.4f}"
    else:
        weight = activation = ALONE_BITS[formats]
        spread, split = f"{formats} all", ""
    line = (
        f"| {formats} | {target} | {score['mean']:.4f} | {score['min']:.4f} | {split} "
        f"| {weight:.2f} | {activation:.2f} | {spread} | {seconds:.0f} |"
    )
    return line, {"seconds": seconds, **result.timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help="FORMATS[@TARGET]")
    parser.add_argument("--output", type=Path, default=RESULT_FILE, help="the table's file")
    parser.add_argument("--view-batches", type=int, default=1, help="the search's view batches")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)
    logging.getLogger("qcal_export.analysis.mixed_formats").setLevel(logging.INFO)
    model = demo_model_path()
    calib_texts, heldout_texts = demo_texts(256, 128)
    calib = demo_batches(calib_texts, batch_size=16)
    heldout = demo_batches(heldout_texts, batch_size=16)
    lines = [
        "# Mixed-format precision search on the demo model",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; {os.cpu_count()} cores",
        f"- versions: {', '.join(f'{k} {v}' for k, v in harness.versions().items())}",
        "- 256 calibration texts (16 batches of 16), 128 held-out texts; target tensorrt "
        "(MatMul inputs), max; a target holds out every 5th calibration batch (3 batches) "
        f"and measures sensitivity on {args.view_batches} calibration batch(es) of 16",
        "",
        "| formats | target cosine | mean cosine | min cosine | held-out split "
        "| bits/weight | bits/activation | units per format | time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    notes = ["", "Phase times (s), from this run:", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for text in args.rows:
            out = Path(tmp) / "q.onnx"
            line, timings = run_row(text, model, calib, heldout, out, args.view_batches)
            lines.append(line)
            print(line, flush=True)
            notes.append(f"- {text}: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    lines += notes
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
