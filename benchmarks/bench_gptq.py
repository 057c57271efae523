"""GPTQ: one layer's time on a device (ours vs a plain column loop), and int4 weight-only
held-out accuracy on the demo model (ours: max, mse, gptq; ONNX Runtime's
``matmul_nbits_quantizer``: RTN and GPTQ).

``layer``: a ``size x size`` weight (float32, seeded) and correlated inputs ``X``
``[tokens, size]``; ``H = Xᵀ X`` in float64. Ours is ``gptq_columns`` (lazy blocks of 128); the
plain loop rounds one column at a time and updates every later column at once (GPTQ without
lazy batching), with the same groups, so both give the same codes up to float32 ties. The
table gives seconds, the share of equal codes and the relative output error
``||X dW||² / ||X W||²`` beside round to nearest's (max ranges).

``demo``: all-MiniLM-L6-v2 (``qcal demo``'s model, texts and held-out embedding cosine), int4
weights only in blocks of 32 and 128 along K. Ours exports QDQ (DequantizeLinear int4 ->
MatMul); ORT's quantizer writes ``MatMulNBits`` (symmetric int4, RTN or GPTQ on the same
calibration batches). Both run in ONNX Runtime on the CPU. Not a test; run it by hand:

    python benchmarks/bench_gptq.py layer --device cuda [--size 4096] [--tokens 4096]
    python benchmarks/bench_gptq.py demo [--blocks 32 128]

The layer table is printed and written to ``benchmarks/results/gptq_layer_<device>.md``,
the demo table to ``benchmarks/results/weight_4bit.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from qcal_export.calibrators.gptq_solve import ColumnGroups, GptqResult, gptq_columns
from qcal_export.spec.formats import INT4

RESULTS = Path(__file__).resolve().parent / "results"


def plain_gptq(weight: torch.Tensor, hessian: torch.Tensor, groups: ColumnGroups) -> GptqResult:
    """GPTQ one column at a time, each error taken off every later column at once (no lazy
    blocks, no act order, 1% damping): the loop the GPTQ paper starts from."""
    w = weight.clone()
    h = hessian.clone()
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0
    h.diagonal().add_(0.01 * float(h.diagonal().mean()))
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    upper = upper.to(w.dtype)
    rounded, codes = torch.empty_like(w), torch.empty_like(w)
    for p in range(w.shape[1]):
        group = p // groups.size
        if not groups.reached[group]:
            groups.reach(group, w[:, p : p + groups.size])
        codes[:, p], rounded[:, p] = groups.quantize(w[:, p], group)
        error = (w[:, p] - rounded[:, p]) / upper[p, p]
        w[:, p + 1 :] -= error[:, None] * upper[p, p + 1 :]
    return GptqResult(rounded, codes.to(groups.fmt.storage_dtype), groups)


def nearest(weight: torch.Tensor, block: int) -> torch.Tensor:
    """Round to nearest, int4 blocks of ``block`` along K with max ranges."""
    groups = ColumnGroups(INT4, block, True, *weight.shape, device=weight.device)
    for g in range(weight.shape[1] // block):
        groups.reach(g, weight[:, g * block : (g + 1) * block])
    out = torch.empty_like(weight)
    for j in range(weight.shape[1]):
        out[:, j] = groups.quantize(weight[:, j], j // block)[1]
    return out


def relative_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    diff = (rounded - weight).double()
    w = weight.double()
    return float(((diff @ hessian) * diff).sum() / ((w @ hessian) * w).sum())


def timed(run: Callable[[], GptqResult], device: torch.device) -> tuple[GptqResult, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def layer_bench(device: torch.device, size: int, tokens: int, block: int) -> list[str]:
    """Table rows (markdown) for one ``size x size`` layer on ``device``."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(size, size, generator=gen) / size**0.5 + torch.eye(size)
    x = (torch.randn(tokens, size, generator=gen) @ mix) * (torch.rand(size, generator=gen) + 0.2)
    weight = torch.randn(size, size, generator=gen).to(device)
    x = x.to(device)
    hessian = x.double().T @ x.double()
    del x
    gptq_columns(weight[:64, :256], hessian[:256, :256], _groups(weight[:64, :256], block))

    def ours() -> GptqResult:
        return gptq_columns(weight, hessian, _groups(weight, block))

    def plain() -> GptqResult:
        return plain_gptq(weight, hessian, _groups(weight, block))

    rtn = relative_error(weight, nearest(weight, block), hessian)
    rows = []
    found = {}
    for name, run in (("ours (lazy blocks of 128)", ours), ("plain column loop", plain)):
        found[name], seconds = timed(run, device)
        error = relative_error(weight, found[name].weight, hessian)
        rows.append((name, seconds, error))
    same = float((found[rows[0][0]].codes == found[rows[1][0]].codes).float().mean())
    ours_seconds = rows[0][1]
    lines = [
        "| method | seconds | vs ours | equal codes | output error | round to nearest |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, seconds, error in rows:
        lines.append(
            f"| {name} | {seconds:.2f} | {seconds / ours_seconds:.1f}x | {same:.4f} | "
            f"{error:.4g} | {rtn:.4g} |"
        )
    return lines


def _groups(weight: torch.Tensor, block: int) -> ColumnGroups:
    return ColumnGroups(INT4, block, True, *weight.shape, device=weight.device)


def header(title: str, lines: list[str]) -> str:
    versions = (
        f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return "\n".join(
        [
            f"# {title}",
            "",
            f"- date: {now}; {os.cpu_count()} cores",
            f"- versions: {versions}",
            *lines,
            "",
        ]
    )


def run_layer(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    rows = layer_bench(device, args.size, args.tokens, args.block)
    text = header(
        f"GPTQ on one {args.size}x{args.size} layer ({args.device})",
        [
            f"- device: {name or args.device}; int4 blocks of {args.block} along K, "
            f"{args.tokens} tokens of correlated inputs; H in float64, rounding in float32",
            "- output error: ||X dW||² / ||X W||² on the same inputs",
            "- equal codes: float32 sums in another order flip a few codes at rounding ties",
            "",
            *rows,
        ],
    )
    print(text)
    (RESULTS / f"gptq_layer_{device.type}.md").write_text(text)


class Reader:
    """An ONNX Runtime CalibrationDataReader over demo batches; ORT's GPTQ iterates it."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self.batches = batches
        self.rewind()

    def __iter__(self):
        return iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self.batches)


def ort_nbits(model: Path, out: Path, block: int, calib: list[dict] | None) -> None:
    """ORT's MatMulNBits int4 quantizer: RTN, or GPTQ on ``calib``."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    if calib is None:
        config = nbits.RTNWeightOnlyQuantConfig()
    else:
        config = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(calib))
    quantizer = nbits.MatMulNBitsQuantizer(
        onnx.load(str(model)), block_size=block, is_symmetric=True, algo_config=config
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)


def qcal_int4(model: Path, out: Path, block: int, calib: list[dict], **options) -> None:
    """Our int4 weight-only calibration (symmetric blocks of ``block`` along K) of ``model``
    on a copy of ``calib`` (a run consumes its batches), written to ``out``; ``options``:
    further ``calibrate_onnx`` arguments (the weight method, its options)."""
    from qcal_export.pipeline.calibrate import calibrate_onnx

    calibrate_onnx(
        model,
        copy.deepcopy(calib),
        format="int4",
        activation_format="none",
        block_size=block,
        output=out,
        validate_batches=0,
        **options,
    )


def run_demo(args: argparse.Namespace) -> None:
    from qcal_export.demo.evaluate import embedding_cosine
    from qcal_export.demo.model import demo_model_path
    from qcal_export.demo.run import BATCH_SIZE, NUM_CALIB, NUM_HELDOUT
    from qcal_export.demo.texts import demo_batches, demo_texts

    model = demo_model_path()
    calib_texts, heldout_texts = demo_texts(NUM_CALIB, NUM_HELDOUT)
    calib = demo_batches(calib_texts, batch_size=BATCH_SIZE)
    heldout = demo_batches(heldout_texts, batch_size=BATCH_SIZE)
    lines = [
        f"- all-MiniLM-L6-v2; {NUM_CALIB} calibration texts ({len(calib)} batches), "
        f"{NUM_HELDOUT} held-out texts; int4 weights only, symmetric, blocks along K",
        "- cosine: per-sentence cosine of the held-out sentence embeddings vs the float model",
        "- qcal gptq: percdamp 0.01, no act order, lazy blocks of 128; H = Xᵀ X (float64) over "
        "every token of the calibration batches, padding included",
        "- ORT: MatMulNBitsQuantizer(block_size, is_symmetric=True); RTN, and GPTQ with "
        "GPTQWeightOnlyQuantConfig's defaults (percdamp 0.01, blocksize 128, no act order) on "
        "the same batches. ORT's symmetric int4 scale is amax / 7.5 (codes -8..7), ours amax / 7",
        "- seconds: the whole run (capture, calibration, export) on a machine shared with other "
        "jobs: indicative only",
        "",
        "| block | tool | method | mean cosine | min cosine | seconds |",
        "| ---: | --- | --- | ---: | ---: | ---: |",
    ]
    with tempfile.TemporaryDirectory() as folder:
        for block in args.blocks:
            for method in ("max", "mse", "gptq"):
                out = Path(folder) / f"qcal_{method}_{block}.onnx"
                start = time.perf_counter()
                qcal_int4(model, out, block, calib, weight_method=method)
                seconds = time.perf_counter() - start
                score = embedding_cosine(model, out, heldout)
                lines.append(_row(block, "qcal", method, score, seconds))
                print(lines[-1], flush=True)
            for method in ("rtn", "gptq"):
                out = Path(folder) / f"ort_{method}_{block}.onnx"
                start = time.perf_counter()
                ort_nbits(model, out, block, copy.deepcopy(calib) if method == "gptq" else None)
                seconds = time.perf_counter() - start
                score = embedding_cosine(model, out, heldout)
                lines.append(_row(block, "ORT matmul_nbits", method, score, seconds))
                print(lines[-1], flush=True)
    text = header("int4 weight-only on the demo model: qcal vs ONNX Runtime's quantizer", lines)
    print(text)
    (RESULTS / "weight_4bit.md").write_text(text)


def _row(block: int, tool: str, method: str, score: dict, seconds: float) -> str:
    return (
        f"| {block} | {tool} | {method} | {score['mean']:.4f} | {score['min']:.4f} | "
        f"{seconds:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    layer = sub.add_parser("layer", help="one layer: ours vs a plain column loop")
    layer.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    layer.add_argument("--size", type=int, default=4096)
    layer.add_argument("--tokens", type=int, default=4096)
    layer.add_argument("--block", type=int, default=128)
    demo = sub.add_parser("demo", help="held-out cosine on the demo model vs ORT's quantizer")
    demo.add_argument("--blocks", type=int, nargs="+", default=[32, 128])
    args = parser.parse_args()
    run_layer(args) if args.what == "layer" else run_demo(args)


if __name__ == "__main__":
    main()
