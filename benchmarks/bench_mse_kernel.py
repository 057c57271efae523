"""MSE candidate sweep on CUDA: plain per-candidate loop vs our torch sweep vs the Triton kernel.

16384 x 4096 bf16, int8, 38 candidates (multipliers 0.25 .. 3.95 step 0.1), per-tensor and
per-axis; then other formats (nvfp4: the global amax sweep, each block's FP8 scale from its own
amax) and int4 blocks, kernel only. Median of CUDA-event timings after
warm-up. The floor is the larger of the kernel's instructions per element per candidate (read
off its SASS: the candidate loop's instructions over the values each thread holds) times
elements times candidates over the measured FP32 instruction rate, and the bytes read over the
measured device-to-device copy rate. Writes the table to ``$OUT`` (or ``benchmarks/results``)
as ``mse_kernel_<gpu>.md`` (``h100``, ``h200``, ...).

Usage: ``python benchmarks/bench_mse_kernel.py`` on a CUDA machine with Triton.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import triton
from gpu_timing import copy_rate, cuda_median, fma_rate, gpu_tag, innermost_loop

from qcal_export.calibrators.kernels import mse_sweep, nvfp4_global
from qcal_export.calibrators.mse import MseCalibrator, mse_multipliers
from qcal_export.spec.formats import FP8_E4M3, INT4, INT8, NVFP4, UINT8, NVFP4Format
from qcal_export.spec.granularity import PerAxis, PerBlock, PerTensor, PerTensorGroup

ROWS, COLS = 16384, 4096
START, STOP, STEP = 0.25, 3.95, 0.1
BATCHES = 10
"""Collects in a row for the per-batch time: the host launches the next batch's work while the
GPU runs this one's, as in a calibration loop (one collect alone also waits for its launches)."""
THREADS = 128
"""Threads per program (4 warps): each holds ``TILE / THREADS`` values of a tile."""


def plain_loop(fmt, x, granularity, scale, zero_point):
    """One full-tensor pass per candidate (the reference sweeps' shape): scales broadcast
    against the tensor as it is laid out, blocks fake-quantized on the blocks view."""
    xf = x.float()
    if isinstance(granularity, PerBlock):
        xf, shape = granularity.groups(xf), (-1, 1)
    else:
        shape = granularity.broadcast_shape(tuple(x.shape))
    losses = []
    for k in range(scale.shape[0]):
        xq = fmt.fake_quant(xf, scale[k].reshape(shape), zero_point[k].reshape(shape))
        error = xq.sub_(xf).square_()
        losses.append(granularity.groups(error).sum(-1, dtype=torch.float64))
    return torch.stack(losses, 1)


def calibrator(fmt, granularity, amax0, fused: bool) -> MseCalibrator:
    cal = MseCalibrator(fmt, granularity, amax0=amax0, start=START, stop=STOP, step=STEP)
    cal._fused = lambda groups: fused
    return cal


def candidates(fmt, x, granularity):
    """``(amax0, scale, zero_point)`` of the sweep: the calibrator's own candidate grid."""
    g = granularity.groups(x.float())
    amax0 = granularity.unflatten(g.abs().amax(1), (g.shape[0],))
    cal = calibrator(fmt, granularity, amax0, fused=True)
    cal.collect(x[:1] if isinstance(granularity, PerTensor) else x)
    return amax0, *fmt.scale_zero_point(*cal._candidates())


def kernel_time(fmt, x, granularity, scale, zero_point) -> tuple[float, float]:
    """(median ms, instructions per element per candidate) of the kernel on bf16 ``x``."""
    sweep, kernel, per_thread = sweep_kernel(fmt)
    groups = granularity.groups(x)
    losses = torch.zeros(groups.shape[0], scale.shape[0], dtype=torch.float64, device="cuda")
    seen = set(_compiled(kernel))
    ms = cuda_median(lambda: sweep(losses, groups, scale, zero_point, fmt), 20)
    compiled = _compiled(kernel)
    new = [k for key, k in compiled.items() if key not in seen] or list(compiled.values())
    sass = new[-1].asm["sass"]
    if fmt is INT8 and "OUT" in os.environ:  # for reading the loop by hand
        name = granularity.describe().replace("(", "").replace(")", "")
        (Path(os.environ["OUT"]) / f"mse_sweep_int8_{name}.sass").write_text(sass)
    try:
        return ms, len(innermost_loop(sass)) / per_thread
    except RuntimeError as error:
        print(f"{fmt.name} {granularity.describe()}: {error}")
        return ms, float("nan")


def sweep_kernel(fmt):
    """``fmt``'s sweep (``mse_sweep_``'s arguments), its Triton kernel and values per thread."""
    if isinstance(fmt, NVFP4Format):

        def sweep(losses, groups, scale, zero_point, fmt):
            return nvfp4_global.nvfp4_global_sweep_(losses, groups, scale, fmt)

        per_thread = fmt.block_size * nvfp4_global.BLOCKS_PER_THREAD
        return sweep, nvfp4_global._global_sweep_kernel, per_thread
    return mse_sweep.mse_sweep_, mse_sweep._sweep_kernel, mse_sweep.TILE // THREADS


def _compiled(kernel) -> dict:
    """``kernel``'s compiled specializations on this device, by cache key."""
    return dict(kernel.device_caches[torch.cuda.current_device()][0])


def bench_int8(x, granularity, fma: float, copy: float) -> list[str]:
    """Rows for one granularity: plain loop, torch sweep, kernel via collect, kernel alone."""
    amax0, scale, zero_point = candidates(INT8, x, granularity)
    num_cand = scale.shape[0]
    steady = calibrator(INT8, granularity, amax0, True)
    plain = cuda_median(lambda: plain_loop(INT8, x, granularity, scale, zero_point), 5)
    alone, instructions = kernel_time(INT8, x, granularity, scale, zero_point)
    times = {
        "plain loop, one torch pass per candidate": plain,
        "torch chunked sweep (collect)": cuda_median(
            lambda: calibrator(INT8, granularity, amax0, False).collect(x), 3, 1
        ),
        "Triton kernel (collect, new calibrator)": cuda_median(
            lambda: calibrator(INT8, granularity, amax0, True).collect(x), 10
        ),
        "Triton kernel (collect, per batch of 10 in a row)": cuda_median(
            lambda: [steady.collect(x) for _ in range(BATCHES)], 5
        )
        / BATCHES,
        "Triton kernel alone": alone,
    }
    floor = max(instructions * x.numel() * num_cand / fma, x.numel() * 2 / copy) * 1e3
    times[f"floor ({instructions:.1f} instr / element / candidate)"] = floor
    name = granularity.describe()
    return [
        f"| {name} | {path} | {ms:.3f} | {plain / ms:.1f}x | {ms / floor:.2f}x |"
        for path, ms in times.items()
    ]


def bench_other(x, fmt, granularity, fma: float, copy: float) -> str:
    """One row of the kernel alone against the plain loop for another format."""
    _, scale, zero_point = candidates(fmt, x, granularity)
    plain = cuda_median(lambda: plain_loop(fmt, x, granularity, scale, zero_point), 3)
    ms, instructions = kernel_time(fmt, x, granularity, scale, zero_point)
    floor = max(instructions * x.numel() * scale.shape[0] / fma, x.numel() * 2 / copy) * 1e3
    return (
        f"| {fmt.name} | {granularity.describe()} | {plain:.3f} | {ms:.3f} | {plain / ms:.1f}x "
        f"| {instructions:.1f} | {floor:.3f} | {ms / floor:.2f}x |"
    )


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(ROWS, COLS, device="cuda").to(torch.bfloat16)
    fma, copy = fma_rate(), copy_rate()
    rows = [r for g in (PerTensor(), PerAxis(0), PerAxis(-1)) for r in bench_int8(x, g, fma, copy)]
    weight = x[:4096]
    others = [
        bench_other(x, UINT8, PerTensor(), fma, copy),
        bench_other(x, FP8_E4M3, PerTensor(), fma, copy),
        bench_other(x, FP8_E4M3, PerAxis(-1), fma, copy),
        bench_other(x, NVFP4, PerTensorGroup(-1, 16), fma, copy),
        bench_other(weight, INT4, PerBlock(-1, 32), fma, copy),
        bench_other(weight, INT4, PerBlock(-1, 128), fma, copy),
    ]
    props = torch.cuda.get_device_properties(0)
    num_cand = len(mse_multipliers(START, STOP, STEP))
    lines = [
        f"# MSE sweep on CUDA ({datetime.date.today()}, {props.name}, torch {torch.__version__}, "
        f"triton {triton.__version__})",
        "",
        f"{ROWS} x {COLS} bf16, int8 symmetric, {num_cand} candidates; median ms (CUDA events).",
        f"Measured: FP32 FMA {fma / 1e12:.1f} T instr/s, copy {copy / 1e12:.2f} TB/s (read + "
        "write); floor = max(SASS instructions per element per candidate x elements x "
        "candidates / FMA rate, bf16 bytes / copy rate).",
        "",
        "| granularity | path | ms | vs plain loop | vs floor |",
        "| --- | --- | ---: | ---: | ---: |",
        *rows,
        "",
        f"Other formats, kernel alone (int4 blocks on the first 4096 rows), {num_cand} candidates:",
        "",
        "| format | granularity | plain loop ms | kernel ms | speed-up | instr | floor ms "
        "| vs floor |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *others,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    (out / f"mse_kernel_{gpu_tag()}.md").write_text(text)


if __name__ == "__main__":
    main()
