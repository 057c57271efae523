"""NVFP4 per-block FP8-scale sweep on CUDA: plain per-candidate loop, our torch sweep, our full
Triton sweep (every loss), our pruned choice (what ``collect`` runs), and NVIDIA ModelOpt's fused
NVFP4MSECalibrator where it imports.

4096 x 4096 bf16 weight, 126 candidates, plain squared error and Hessian-weighted (``H`` from
4096 random activations with unequal channel scales). Median of CUDA-event timings after
warm-up. A floor is the larger of (a) a kernel's instructions per element per candidate, read
off its SASS (the candidate loop's instructions over the values one thread holds; ALU-pipe
instructions count twice where that pipe, at half rate, would bound), times elements times
candidates (126 for the full sweep; those scored for the pruned scan) over the measured FP32 FMA
rate, and (b) the bytes read and written (bf16 weight, and for the full sweep float64 losses and
float32 bounds for the Hessian) over the measured device-to-device copy rate. Writes the table
to ``$OUT`` (or ``benchmarks/results``) as ``nvfp4_kernel_<gpu>.md`` (``h100``, ``h200``, ...),
and the SASS beside it when ``$OUT`` is set.

Usage: ``python benchmarks/bench_nvfp4_kernel.py`` on a CUDA machine with Triton.
"""

from __future__ import annotations

import collections
import datetime
import os
from pathlib import Path

import torch
import triton
from gpu_timing import copy_rate, cuda_median, fma_rate, gpu_tag, innermost_loop

from qcal_export.calibrators.hessian import BlockHessian
from qcal_export.calibrators.kernels import nvfp4_best, nvfp4_sweep
from qcal_export.calibrators.nvfp4_mse import NVFP4MseCalibrator, fp8_scale_candidates
from qcal_export.spec.formats import NVFP4
from qcal_export.spec.granularity import PerBlock

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


def compiled_kernel(kernel, run) -> triton.compiler.CompiledKernel | None:
    """The variant of ``kernel`` that ``run`` compiles (None where the cache cannot be read)."""
    try:
        cache = kernel.device_caches[torch.cuda.current_device()][0]
        before = set(cache)
        run()
        new = [cache[key] for key in cache if key not in before]
        return new[-1] if new else None
    except (AttributeError, KeyError, IndexError, TypeError):
        run()
        return None


def loop_instructions(kernel, run, values_per_thread: int, out: Path | None, name: str):
    """SASS instructions per value and candidate of ``kernel``'s candidate loop, and the loop's
    opcode histogram; the SASS is written to ``out`` as ``name``."""
    compiled = compiled_kernel(kernel, run)
    if compiled is None:
        return 0.0, "SASS not read"
    sass = compiled.asm["sass"]
    if out is not None:
        (out / name).write_text(sass)
    return instructions_per_value(sass, values_per_thread)


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


def modelopt_agreement(modelopt_run, blocks, global_amax, h32, ours) -> float:
    """Percent of blocks where ModelOpt's chosen FP8 scale is ours."""
    mo_amax = modelopt_run(blocks, global_amax, h32)
    values = fp8_scale_candidates().cuda().float()
    mo_codes = (mo_amax.float() * 448 / global_amax)[:, None].sub(values).abs().argmin(1)
    ours_codes = (ours.view(torch.uint8).flatten().long() - 1).to(mo_codes.device)
    return float((mo_codes == ours_codes).float().mean()) * 100


def bench(weight, hessian, fma: float, copy: float, out: Path | None):
    """Table rows, notes, floors and the timings of one error kind."""
    name = "plain" if hessian is None else "hessian"
    global_amax = weight.float().abs().amax()
    blocks = PerBlock(-1, 16).groups(weight).contiguous()
    scales = NVFP4.effective_scales(fp8_scale_candidates().cuda(), NVFP4.global_scale(global_amax))
    h32 = None if hessian is None else hessian.float()

    def calibrate(fused: bool):
        cal = NVFP4MseCalibrator(global_amax=global_amax, hessian=hessian)
        if not fused:
            cal._fused = lambda groups: False
        cal.collect(weight)
        return cal.compute_block_scales()

    def sweep():
        return nvfp4_sweep.nvfp4_scale_sweep(blocks, scales, hessian)

    def best():
        return nvfp4_best.nvfp4_best_scales(blocks, scales, hessian)

    per_thread = 1 if hessian is not None else nvfp4_sweep.PLAIN_BLOCKS_PER_THREAD
    sweep_instr, sweep_loop = loop_instructions(
        nvfp4_sweep._score_kernel, sweep, 16 * per_thread, out, f"nvfp4_sweep_{name}.sass"
    )
    per_thread = 1 if hessian is not None else nvfp4_best.PLAIN_BLOCKS_PER_THREAD
    best_instr, best_loop = loop_instructions(
        nvfp4_best._best_kernel, best, 16 * per_thread, out, f"nvfp4_best_{name}.sass"
    )
    _, sweep_best, flagged = sweep()
    pruned, counts = nvfp4_best.nvfp4_best_scales(blocks, scales, hessian, counts=True)
    ours, expected = calibrate(True), calibrate(False)
    same = float((ours.view(torch.uint8) == expected.view(torch.uint8)).float().mean()) * 100
    plain = cuda_median(lambda: plain_loop(blocks.float(), scales, h32), 3, 1)
    times = {
        "plain loop, one f32 torch pass per candidate": plain,
        "torch sweep (collect + decide, float64)": cuda_median(lambda: calibrate(False), 1, 0),
        "full sweep kernels, all 126 losses written (bf16 blocks)": cuda_median(sweep, 20),
        "pruned kernels alone (ranges, sort, scan, repair)": cuda_median(best, 20),
        "ours: collect + compute_block_scales": cuda_median(lambda: calibrate(True), 20),
    }
    scored = float(counts["scored"])
    notes = [
        f"{name}: choices equal to the torch sweep's in {same:.4f}% of blocks, to the full "
        f"sweep's in {float((pruned == sweep_best).float().mean()) * 100:.4f}%; candidates "
        f"scored per block {scored:.1f} of 126 (own ranges {float(counts['needed']):.1f}); "
        f"{int(counts['repaired'])} blocks redone in float64 (full sweep: {int(flagged)})",
        f"{name}: full-sweep loop {sweep_loop}",
        f"{name}: pruned scan loop {best_loop}",
    ]
    modelopt_run, about = modelopt_sweep()
    if modelopt_run is not None:
        agree = modelopt_agreement(modelopt_run, blocks, global_amax, h32, ours)
        times[f"ModelOpt NVFP4MSECalibrator ({about})"] = cuda_median(
            lambda: modelopt_run(blocks, global_amax, h32), 20
        )
        notes.append(f"{name}: ModelOpt's chosen scales equal ours in {agree:.3f}% of blocks")
    else:
        notes.append(f"{name}: ModelOpt {about}")
    losses_bytes = blocks.shape[0] * scales.numel() * (8 if hessian is None else 12)
    floors = {
        "floor of the full sweep (126 candidates)": max(
            sweep_instr * weight.numel() * scales.numel() / fma,
            (weight.numel() * 2 + losses_bytes) / copy,
        )
        * 1e3,
        "floor of the pruned scan (candidates scored)": max(
            best_instr * weight.numel() * scored / fma, weight.numel() * 4 / copy
        )
        * 1e3,
    }
    return notes, {**times, **floors}, floors, (sweep_instr, best_instr)


def table_rows(name: str, times: dict[str, float], floors: dict[str, float]) -> list[str]:
    """One markdown row per path: ms, speed-up over the plain loop, ratio to each floor."""
    plain = times["plain loop, one f32 torch pass per candidate"]
    full, pruned = floors.values()
    return [
        f"| {name} | {path} | {ms:.3f} | {plain / ms:.1f}x | {ms / full:.2f}x "
        f"| {ms / pruned:.2f}x |"
        for path, ms in times.items()
    ]


def main() -> None:
    torch.manual_seed(0)
    weight = (torch.randn(ROWS, COLS, device="cuda") * 0.02).to(torch.bfloat16)
    acts = torch.randn(4096, COLS, device="cuda", dtype=torch.float64)
    acts *= torch.rand(COLS, device="cuda", dtype=torch.float64).mul_(3).add_(0.1)
    block_hessian = BlockHessian()
    block_hessian.collect(acts)
    fma, copy = fma_rate(), copy_rate()
    out = Path(os.environ["OUT"]) if "OUT" in os.environ else None
    rows, notes, counts, ours_ms, peer_ms = [], [], {}, {}, {}
    for hessian in (None, block_hessian.hessian):
        key = "plain" if hessian is None else "hessian"
        more_notes, times, floors, counts[key] = bench(weight, hessian, fma, copy, out)
        rows += table_rows(key, times, floors)
        notes += more_notes
        ours_ms[key] = times["ours: collect + compute_block_scales"]
        peer_ms[key] = next((ms for path, ms in times.items() if "ModelOpt" in path), None)
    props = torch.cuda.get_device_properties(0)
    versus = ", ".join(
        f"{key} {peer_ms[key] / ours_ms[key]:.2f}x" for key in ours_ms if peer_ms[key] is not None
    )
    lines = [
        f"# NVFP4 block-scale sweep on CUDA ({datetime.date.today()}, {props.name}, torch "
        f"{torch.__version__}, triton {triton.__version__})",
        "",
        f"{ROWS} x {COLS} bf16 weight, 126 FP8 candidates per block of 16; median ms (CUDA "
        "events).",
        f"Measured: FP32 FMA {fma / 1e12:.1f} T instr/s, copy {copy / 1e12:.2f} TB/s (read + "
        "write). Floors = max(SASS instructions per value and candidate of the candidate loop "
        f"(full sweep: plain {counts['plain'][0]:.2f}, hessian {counts['hessian'][0]:.2f}; "
        f"pruned scan: plain {counts['plain'][1]:.2f}, hessian {counts['hessian'][1]:.2f}) x "
        "values x candidates (126, or those the pruned scan scores) / FMA rate, bytes moved / "
        "copy rate).",
        f"Hessian-weighted / plain, ours: {ours_ms['hessian'] / ours_ms['plain']:.2f}x. "
        f"ModelOpt / ours (collect + decide): {versus or 'not measured'}.",
        "",
        "| error | path | ms | vs plain loop | vs full-sweep floor | vs pruned floor |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        *[f"- {note}" for note in notes],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    target = out if out is not None else Path(__file__).parent / "results"
    (target / f"nvfp4_kernel_{gpu_tag()}.md").write_text(text)


if __name__ == "__main__":
    main()
