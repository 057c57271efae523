"""CUDA timing helpers shared by the kernel benchmarks: event medians, FMA and copy rates."""

from __future__ import annotations

import re
import statistics

import torch
import triton
import triton.language as tl


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


def sass_instructions(sass: str) -> tuple[list[str], dict[str, int]]:
    """Instructions of a SASS listing in order, and each label's or address's index among them.

    Reads both ``cuobjdump -sass`` (``/*0a30*/ FFMA ...;``) and Triton's ``asm["sass"]``
    (``--:-:-:-:1 FFMA ...;`` with ``LBB0:`` labels).
    """
    instructions: list[str] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        label = re.match(r"^\s*([.\w]+):\s*$", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        found = re.search(r"(?:/\*([0-9a-f]{4,})\*/|\t)\s*([^;/]*?)\s*;", line)
        if found and found.group(2):
            if found.group(1):
                labels["0x" + found.group(1).lstrip("0").rjust(1, "0")] = len(instructions)
            instructions.append(found.group(2))
    return instructions, labels


def innermost_loop(sass: str) -> list[str]:
    """Instructions of the shortest backward-branch loop (the candidate loop of a sweep)."""
    instructions, labels = sass_instructions(sass)
    loops = []
    for index, text in enumerate(instructions):
        target = re.search(r"\bBRA\b.*?(`\(([.\w]+)\)|0x([0-9a-f]+)|\b(\.?L\w+)\b)", text)
        if not target:
            continue
        name = target.group(2) or target.group(4)
        name = name if name else "0x" + target.group(3).lstrip("0").rjust(1, "0")
        begin = labels.get(name)
        if begin is not None and begin < index:
            loops.append((begin, index))
    if not loops:
        return []
    begin, end = min(loops, key=lambda loop: loop[1] - loop[0])
    return instructions[begin : end + 1]


def gpu_tag() -> str:
    """A short name of this GPU for result file names: ``h100``, ``h200``, ...

    Results of different GPUs stay side by side instead of overwriting each other."""
    name = torch.cuda.get_device_properties(0).name
    found = re.search(r"\b([A-Z]\d{2,4})\b", name)
    return (found.group(1) if found else re.sub(r"\W+", "_", name)).lower()
