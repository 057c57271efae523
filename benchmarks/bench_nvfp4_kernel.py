"""NVFP4 per-block FP8-scale sweep on CUDA: plain per-candidate loop, our torch sweep, the fused
Triton kernel, and NVIDIA ModelOpt's fused NVFP4MSECalibrator where it imports.

4096 x 4096 bf16 weight, 126 candidates, plain squared error and Hessian-weighted (``H`` from
4096 random activations with unequal channel scales). Median of CUDA-event timings after
warm-up. The floor is the larger of (a) the kernel's instructions per element per candidate,
read off its SASS (the candidate loop's instructions over the values one thread holds; ALU-pipe
instructions count twice where that pipe, at half rate, would bound), times elements times
candidates over the measured FP32 FMA rate, and (b) the bytes read and written (bf16 weight,
float64 losses, float32 bounds for the Hessian) over the measured device-to-device copy rate.
Writes the table to ``$OUT`` (or ``benchmarks/results``) as ``nvfp4_kernel_h100.md``, and the
SASS beside it when ``$OUT`` is set.

Usage: ``python benchmarks/bench_nvfp4_kernel.py`` on a CUDA machine with Triton.
"""

from __future__ import annotations

import collections
import datetime
import os
from pathlib import Path

import torch
import triton
from gpu_timing import copy_rate, cuda_median, fma_rate, innermost_loop

from qcal_export.calibrators.kernels import nvfp4_sweep
from qcal_export.calibrators.nvfp4_mse import (
    BlockHessian,
    NVFP4MseCalibrator,
    fp8_scale_candidates,
)
from qcal_export.formats import NVFP4
from qcal_export.granularity import PerBlock

ROWS, COLS = 4096, 4096
ALU = {"FMNMX", "FSEL", "FSETP", "LOP3", "ISETP", "SEL", "IADD3", "LEA", "SHF", "MOV", "PRMT"}
FP64 = {"DMUL", "DADD", "DFMA"}


def plain_loop(blocks: torch.Tensor, scales: torch.Tensor, hessian: torch.Tensor | None):
    """One float32 torch pass over the whole weight per candidate."""
    losses = []
    for s in scales:
        diff = NVFP4.fake_quant_blocks(blocks, s) - blocks
        if hessian is None:
            losses.append(diff.square().sum(-1))
        else:
            d = diff.view(-1, hessian.shape[0], 16)
            losses.append(torch.einsum("rgi,gij,rgj->rg", d, hessian, d).reshape(-1))
    return torch.stack(losses, 1)


def instructions_per_value(sass: str, values_per_thread: int) -> tuple[float, str]:
    """FP32-equivalent issue slots per value and candidate, and the loop's opcode histogram."""
    loop = innermost_loop(sass)
    ops = collections.Counter(
        text.split()[1 if text.startswith("@") else 0].split(".")[0] for text in loop
    )
    alu = sum(n for op, n in ops.items() if op in ALU)
    fp64 = sum(n for op, n in ops.items() if op in FP64)
    slots = max(len(loop), 2 * alu, 2 * fp64)
    histogram = ", ".join(f"{op} {n}" for op, n in ops.most_common())
    return slots / values_per_thread, f"{len(loop)} instructions ({histogram})"


def compiled_kernel(run) -> triton.compiler.CompiledKernel | None:
    """The score kernel that ``run`` compiles (None where the cache cannot be read)."""
    try:
        cache = nvfp4_sweep._score_kernel.device_caches[torch.cuda.current_device()][0]
        before = set(cache)
        run()
        new = [cache[key] for key in cache if key not in before]
        return new[-1] if new else None
    except (AttributeError, KeyError, IndexError, TypeError):
        run()
        return None


def modelopt_sweep():
    """ModelOpt's NVFP4MSECalibrator (0.47: fused Triton paths), or None and why not."""
    try:
        from modelopt.torch.quantization.calib.mse import NVFP4MSECalibrator
    except Exception as error:  # optional: any import failure means "not measured"
        return None, f"not importable: {type(error).__name__}: {error}"
    import modelopt

    def run(blocks, global_amax, hessian):
        cal = NVFP4MSECalibrator(
            amax=blocks.float().abs().amax(-1), global_amax=global_amax, hessian=hessian
        )
        cal.collect(blocks)
        return cal.compute_amax()

    return run, f"modelopt {modelopt.__version__}"


def bench(weight, hessian, fma: float, copy: float, out: Path | None):
    """Table rows, notes, SASS instructions per value and the timings of one error kind."""
    name = "plain" if hessian is None else "hessian"
    global_amax = weight.float().abs().amax()
    blocks = PerBlock(-1, 16).groups(weight).contiguous()
    blocks32 = blocks.float()
    scales = NVFP4.effective_scales(fp8_scale_candidates().cuda(), NVFP4.global_scale(global_amax))
    h32 = None if hessian is None else hessian.float()

    def fused():
        cal = NVFP4MseCalibrator(global_amax=global_amax, hessian=hessian)
        cal.collect(weight)
        return cal.compute_block_scales()

    def reference():
        cal = NVFP4MseCalibrator(global_amax=global_amax, hessian=hessian)
        cal._fused = lambda groups: False
        cal.collect(weight)
        return cal.compute_block_scales()

    compiled = compiled_kernel(lambda: nvfp4_sweep.nvfp4_scale_sweep(blocks, scales, hessian))
    per_thread = 1 if hessian is not None else nvfp4_sweep.PLAIN_BLOCKS_PER_THREAD
    instructions, loop_text = 0.0, "SASS not read"
    if compiled is not None:
        sass = compiled.asm["sass"]
        instructions, loop_text = instructions_per_value(sass, 16 * per_thread)
        if out is not None:
            (out / f"nvfp4_sweep_{name}.sass").write_text(sass)
    _, _, flagged = nvfp4_sweep.nvfp4_scale_sweep(blocks, scales, hessian)
    ours = fused()
    expected = reference()
    same = float((ours.view(torch.uint8) == expected.view(torch.uint8)).float().mean()) * 100
    plain = cuda_median(lambda: plain_loop(blocks32, scales, h32), 3, 1)
    times = {
        "plain loop, one f32 torch pass per candidate": plain,
        "torch sweep (collect + decide, float64)": cuda_median(reference, 1, 0),
        "fused kernel alone (bf16 blocks)": cuda_median(
            lambda: nvfp4_sweep.nvfp4_scale_sweep(blocks, scales, hessian), 20
        ),
        "fused score kernel only (no float64 repair pass)": cuda_median(
            lambda: nvfp4_sweep.nvfp4_scale_sweep(blocks, scales, hessian, repair=False), 20
        ),
        "fused (collect + compute_block_scales)": cuda_median(fused, 20),
    }
    notes = [
        f"{name}: {int(flagged)} of {blocks.shape[0]} blocks recomputed in float64; "
        f"choices equal to the torch sweep's: {same:.4f}% of blocks; loop: {loop_text}"
    ]
    modelopt_run, about = modelopt_sweep()
    if modelopt_run is not None:
        mo_amax = modelopt_run(blocks, global_amax, h32)
        values = fp8_scale_candidates().cuda().float()
        mo_codes = (mo_amax.float() * 448 / global_amax)[:, None].sub(values).abs().argmin(1)
        ours_codes = (ours.view(torch.uint8).flatten().long() - 1).to(mo_codes.device)
        agree = float((mo_codes == ours_codes).float().mean()) * 100
        times[f"ModelOpt NVFP4MSECalibrator ({about})"] = cuda_median(
            lambda: modelopt_run(blocks, global_amax, h32), 20
        )
        notes.append(f"{name}: ModelOpt's chosen scales equal ours in {agree:.3f}% of blocks")
    else:
        notes.append(f"{name}: ModelOpt {about}")
    num_cand = scales.numel()
    scratch = 0 if hessian is None else 4  # float32 bounds the repair pass reads
    bytes_moved = weight.numel() * 2 + blocks.shape[0] * num_cand * (8 + scratch)
    floor = max(instructions * weight.numel() * num_cand / fma, bytes_moved / copy) * 1e3
    times["floor"] = floor
    rows = [
        f"| {name} | {path} | {ms:.3f} | {plain / ms:.1f}x | {ms / floor:.2f}x |"
        for path, ms in times.items()
    ]
    return rows, notes, instructions, times


def main() -> None:
    torch.manual_seed(0)
    weight = (torch.randn(ROWS, COLS, device="cuda") * 0.02).to(torch.bfloat16)
    acts = torch.randn(4096, COLS, device="cuda", dtype=torch.float64)
    acts *= torch.rand(COLS, device="cuda", dtype=torch.float64).mul_(3).add_(0.1)
    block_hessian = BlockHessian()
    block_hessian.collect(acts)
    fma, copy = fma_rate(), copy_rate()
    out = Path(os.environ["OUT"]) if "OUT" in os.environ else None
    rows, notes, counts, fused_ms = [], [], {}, {}
    for hessian in (None, block_hessian.hessian):
        more, more_notes, instructions, times = bench(weight, hessian, fma, copy, out)
        rows += more
        notes += more_notes
        key = "plain" if hessian is None else "hessian"
        counts[key] = instructions
        fused_ms[key] = times["fused (collect + compute_block_scales)"]
    props = torch.cuda.get_device_properties(0)
    lines = [
        f"# NVFP4 block-scale sweep on CUDA ({datetime.date.today()}, {props.name}, torch "
        f"{torch.__version__}, triton {triton.__version__})",
        "",
        f"{ROWS} x {COLS} bf16 weight, 126 FP8 candidates per block of 16; median ms (CUDA "
        "events).",
        f"Measured: FP32 FMA {fma / 1e12:.1f} T instr/s, copy {copy / 1e12:.2f} TB/s (read + "
        f"write); floor = max(SASS instr/value/candidate (plain {counts['plain']:.2f}, hessian "
        f"{counts['hessian']:.2f}) x values x candidates / FMA rate, (bf16 weight + float64 "
        "losses) bytes / copy rate).",
        f"Hessian-weighted / plain fused: {fused_ms['hessian'] / fused_ms['plain']:.2f}x.",
        "",
        "| error | path | ms | vs plain loop | vs floor |",
        "| --- | --- | ---: | ---: | ---: |",
        *rows,
        "",
        *[f"- {note}" for note in notes],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    target = out if out is not None else Path(__file__).parent / "results"
    (target / "nvfp4_kernel_h100.md").write_text(text)


if __name__ == "__main__":
    main()
