"""int4 weight-only on the LLM-shaped benchmark model: qcal's max, mse, gptq, awq and awq with
clip beside ONNX Runtime's ``matmul_nbits_quantizer`` (RTN and GPTQ), on the same batches.

The model is ``benchmarks/llm_model.py``'s seeded Llama (random weights: its figures show what
each method does to a decoder of this shape and what it costs, not what it keeps of a trained
model). Its token batches are split: the first ``--calib`` calibrate, the rest are held out.
Per row: the relative L2 error of the held-out logits against the float model's, their mean
cosine per token, and the wall time of the whole quantization. Not a test; run it by hand:

    python benchmarks/llm_model.py --size small --out /tmp/llm_w4 --batches 6 --seq 128
    python benchmarks/bench_weight_4bit_llm.py /tmp/llm_w4 [--calib 4] [--blocks 32 128]

The table is printed and written to ``benchmarks/results/weight_4bit_llm.md`` (``--output``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import onnxruntime as ort
from bench_gptq import ort_nbits, qcal_int4

RESULT_FILE = Path(__file__).resolve().parent / "results" / "weight_4bit_llm.md"
QCAL_ROWS = {
    "max": {"weight_method": "max"},
    "mse": {"weight_method": "mse"},
    "gptq": {"weight_method": "gptq"},
    "awq": {"weight_method": "awq"},
    "awq, clip": {"weight_method": "awq", "method_options": {"clip": 1}},
}


def batches(folder: Path) -> list[dict[str, np.ndarray]]:
    """The model folder's token batches, in order."""
    out = []
    for path in sorted((folder / "data").glob("*.npz")):
        with np.load(path) as saved:
            out.append({name: saved[name] for name in saved.files})
    return out


def logits(model: Path, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return [session.run(None, feed)[0].astype(np.float64) for feed in feeds]


def score(reference: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """(relative L2 of all logits, mean cosine per token) against the float model's."""
    ref, out = (
        np.concatenate([r.ravel() for r in reference]),
        np.concatenate([g.ravel() for g in got]),
    )
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    cosines = []
    for r, g in zip(reference, got, strict=True):
        r2, g2 = r.reshape(-1, r.shape[-1]), g.reshape(-1, g.shape[-1])
        dot = np.sum(r2 * g2, axis=1)
        cosines.append(dot / (np.linalg.norm(r2, axis=1) * np.linalg.norm(g2, axis=1)))
    return rel, float(np.mean(np.concatenate(cosines)))


def run_rows(args: argparse.Namespace) -> list[str]:
    model = args.model_dir / "model.onnx"
    data = batches(args.model_dir)
    calib, heldout = data[: args.calib], data[args.calib :]
    reference = logits(model, heldout)
    lines = []
    with tempfile.TemporaryDirectory() as folder:
        for block in args.blocks:
            for name, options in QCAL_ROWS.items():
                out = Path(folder) / f"qcal_{block}.onnx"
                start = time.perf_counter()
                qcal_int4(model, out, block, calib, **options)
                lines.append(_row(block, "qcal", name, reference, out, heldout, start))
                print(lines[-1], flush=True)
            for method in ("rtn", "gptq") if args.ort_gptq else ("rtn",):
                out = Path(folder) / f"ort_{block}.onnx"
                start = time.perf_counter()
                ort_nbits(model, out, block, copy.deepcopy(calib) if method == "gptq" else None)
                lines.append(
                    _row(block, "ORT matmul_nbits", method, reference, out, heldout, start)
                )
                print(lines[-1], flush=True)
    return lines


def _row(
    block: int, tool: str, method: str, reference: list, out: Path, heldout: list, start: float
) -> str:
    seconds = time.perf_counter() - start
    rel, cosine = score(reference, logits(out, heldout))
    return f"| {block} | {tool} | {method} | {rel:.4f} | {cosine:.4f} | {seconds:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="a folder llm_model.py built")
    parser.add_argument("--calib", type=int, default=4, help="batches calibrated on")
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--ort-gptq", action="store_true", help="also ORT's GPTQ (slow)")
    parser.add_argument("--output", type=Path, default=RESULT_FILE)
    args = parser.parse_args()
    shapes = {k: v.shape for k, v in batches(args.model_dir)[0].items()}
    lines = [
        "# int4 weight-only on the LLM-shaped benchmark model: qcal vs ONNX Runtime's quantizer",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; "
        f"{os.cpu_count()} cores; ONNX Runtime CPU EP",
        f"- versions: {', '.join(f'{k} {v}' for k, v in harness.versions().items())}",
        f"- model: {args.model_dir} (benchmarks/llm_model.py, seeded random weights); "
        f"batches {shapes}; the first {args.calib} calibrate, the rest are held out",
        "- int4 symmetric weights of every MatMul in blocks along K, activations float; "
        "rel L2: of all held-out logits against the float model's; cosine: mean per token",
        "- ORT: MatMulNBitsQuantizer(block_size, is_symmetric=True), RTN"
        + (" and GPTQ at its defaults on the same batches" if args.ort_gptq else ""),
        "",
        "| block | tool | method | logits rel L2 | cosine per token | seconds |",
        "| ---: | --- | --- | ---: | ---: | ---: |",
    ]
    lines += run_rows(args)
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
