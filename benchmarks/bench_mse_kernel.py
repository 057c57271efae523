"""MSE candidate sweep on CUDA: plain per-candidate loop vs our torch sweep vs the Triton kernel.

16384 x 4096 bf16, int8, 38 candidates (multipliers 0.25 .. 3.95 step 0.1), per-tensor and
per-axis. Median of CUDA-event timings after warm-up. The floor is the larger of the kernel's
FP32 instructions (per element per candidate, times elements times candidates) over the measured
FP32 instruction rate (an FMA kernel) and the bytes read over the measured device-to-device copy
rate. Writes the table to ``$OUT`` (or ``benchmarks/results``) as ``mse_kernel_h100.md``.

Usage: ``python benchmarks/bench_mse_kernel.py`` on a CUDA machine with Triton.
"""

from __future__ import annotations

import datetime
import os
import statistics
from pathlib import Path

import torch
import triton
import triton.language as tl

from qcal_export.calibrators.kernels.mse_sweep import mse_sweep_
from qcal_export.calibrators.mse import MseCalibrator
from qcal_export.formats import INT8
from qcal_export.granularity import PerAxis, PerTensor

ROWS, COLS = 16384, 4096
START, STOP, STEP = 0.25, 3.95, 0.1
INSTRUCTIONS = 23
"""FP32-equivalent instructions per element per candidate (int8 symmetric), by hand, not yet
checked against SASS: div.rn.f32 ~8 (MUFU.RCP, 5 FFMA, FCHK, branch), FRND, 2 FMNMX, FMUL
(dequantize) = 12 FP32; then the float64 difference and square-sum, 2 F2F + DADD + DFMA = 4
FP64 at the H100's half FP32 rate = 8; plus ~3 for the candidate loop."""


def cuda_median(fn, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event timings, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


@triton.jit
def _fma_kernel(out_ptr, a, b, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = offsets.to(tl.float32)
    y = x + 1.0
    for _ in range(ITERS):
        x = x * a + b
        y = y * a + b
    tl.store(out_ptr + offsets, x + y)


def fma_rate() -> float:
    """Measured FP32 FMA instructions per second (per lane)."""
    block, iters, programs = 1024, 4096, 132 * 64
    out = torch.empty(programs * block, device="cuda")
    ms = cuda_median(lambda: _fma_kernel[(programs,)](out, 0.999, 0.001, iters, block), 5)
    return programs * block * iters * 2 / (ms * 1e-3)


def copy_rate() -> float:
    """Measured device-to-device copy, bytes read plus written per second."""
    src = torch.empty(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_median(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def plain_loop(x, granularity, scale, zero_point):
    """One full-tensor pass per candidate (the reference sweeps' shape)."""
    xf = x.float()
    shape = granularity.broadcast_shape(tuple(x.shape))
    groups = granularity.groups
    losses = []
    for k in range(scale.shape[0]):
        xq = INT8.fake_quant(xf, scale[k].reshape(shape), zero_point[k].reshape(shape))
        losses.append(groups(xq.sub_(xf).square_()).sum(-1, dtype=torch.float64))
    return torch.stack(losses, 1)


def calibrator(granularity, amax0, fused: bool) -> MseCalibrator:
    cal = MseCalibrator(INT8, granularity, amax0=amax0, start=START, stop=STOP, step=STEP)
    cal._fused = lambda groups: fused
    return cal


def bench(x, granularity, fma: float, copy: float) -> tuple[int, list[str]]:
    """Table rows for one granularity; returns (candidate count, rows)."""
    g = granularity.groups(x.float())
    amax0 = granularity.unflatten(g.abs().amax(1), (g.shape[0],))
    cal = calibrator(granularity, amax0, fused=True)
    cal.collect(x[:1] if isinstance(granularity, PerTensor) else x)  # state for the candidates
    scale, zero_point = INT8.scale_zero_point(*cal._candidates())
    num_cand = scale.shape[0]
    groups_bf16 = granularity.groups(x).contiguous()
    losses = torch.zeros(g.shape[0], num_cand, dtype=torch.float64, device="cuda")
    plain = cuda_median(lambda: plain_loop(x, granularity, scale, zero_point), 5)
    times = {
        "plain loop, one torch pass per candidate": plain,
        "torch chunked sweep (collect)": cuda_median(
            lambda: calibrator(granularity, amax0, False).collect(x), 3, 1
        ),
        "Triton kernel (collect)": cuda_median(
            lambda: calibrator(granularity, amax0, True).collect(x), 10
        ),
        "Triton kernel alone (bf16 groups)": cuda_median(
            lambda: mse_sweep_(losses, groups_bf16, scale, zero_point, INT8), 20
        ),
    }
    floor = max(INSTRUCTIONS * x.numel() * num_cand / fma, x.numel() * 2 / copy) * 1e3
    times["floor"] = floor
    name = granularity.describe()
    rows = [
        f"| {name} | {path} | {ms:.3f} | {plain / ms:.1f}x | {ms / floor:.1f}x |"
        for path, ms in times.items()
    ]
    return num_cand, rows


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(ROWS, COLS, device="cuda").to(torch.bfloat16)
    fma, copy = fma_rate(), copy_rate()
    rows = []
    for granularity in (PerTensor(), PerAxis(0), PerAxis(-1)):
        num_cand, more = bench(x, granularity, fma, copy)
        rows += more
    props = torch.cuda.get_device_properties(0)
    lines = [
        f"# MSE sweep on CUDA ({datetime.date.today()}, {props.name}, torch {torch.__version__}, "
        f"triton {triton.__version__})",
        "",
        f"{ROWS} x {COLS} bf16, int8 symmetric, {num_cand} candidates; median ms (CUDA events).",
        f"Measured: FP32 FMA {fma / 1e12:.1f} T instr/s, copy {copy / 1e12:.2f} TB/s (read + "
        f"write); floor = max({INSTRUCTIONS} instr x elements x candidates / FMA rate, "
        "bf16 bytes / copy rate).",
        "",
        "| granularity | path | ms | vs plain loop | vs floor |",
        "| --- | --- | ---: | ---: | ---: |",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    (out / "mse_kernel_h100.md").write_text(text)


if __name__ == "__main__":
    main()
