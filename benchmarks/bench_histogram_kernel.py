"""Histogram update on CUDA: the torch path vs the Triton kernel vs ``torch.histc`` per group.

16384 x 4096 bf16 (a standard normal activation), 2048 bins (4096 signed bins per group),
per-tensor and per-axis. ``collect`` rows time a calibrator that has already seen the batch
(steady state: same range, no rebin); "kernel alone" times ``histogram_add_`` on the bf16
groups (also with more programs, and per-tensor without or with more private int32 rows);
``torch.histc`` is one call per group over the same range (float bin edges, so not our exact
bins: a speed baseline only). Median of CUDA-event timings after warm-up. The floor is the bf16
bytes read over the measured device-to-device copy rate; per-axis(0) also touches its 512 MiB
int64 state, which the floor leaves out. Writes ``histogram_kernel_<gpu>.md`` (``h100``,
``h200``, ...) to ``$OUT`` (or ``benchmarks/results``).

Usage: ``python benchmarks/bench_histogram_kernel.py`` on a CUDA machine with Triton.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import triton
from gpu_timing import copy_rate, cuda_median, gpu_tag

from qcal_export.calibrators import PercentileCalibrator
from qcal_export.calibrators.histogram import HistogramCalibrator
from qcal_export.calibrators.kernels import histogram as kernel
from qcal_export.calibrators.kernels.histogram import histogram_add_
from qcal_export.spec.formats import INT8
from qcal_export.spec.granularity import PerAxis, PerTensor

ROWS, COLS, BINS = 16384, 4096, 2048


def calibrator(granularity, x: torch.Tensor, fused: bool) -> HistogramCalibrator:
    """A calibrator on ``fused``'s path that has collected ``x`` once."""
    cal = PercentileCalibrator(INT8, granularity, bins=BINS)
    cal._fused = lambda groups: fused
    cal.collect(x)
    return cal


def histc_per_group(groups: torch.Tensor, width: torch.Tensor) -> list[torch.Tensor]:
    """One ``torch.histc`` per group over ``[-BINS w, BINS w)`` with ``2 * BINS`` bins."""
    limits = (width * BINS).tolist()
    return [
        torch.histc(row, bins=2 * BINS, min=-limit, max=limit)
        for row, limit in zip(groups, limits, strict=True)
    ]


def bench(x: torch.Tensor, granularity, copy: float) -> list[str]:
    """Table rows for one granularity (and an exactness check of the two collect paths)."""
    fused, reference = calibrator(granularity, x, True), calibrator(granularity, x, False)
    assert torch.equal(fused.state_dict()["hist"], reference.state_dict()["hist"])
    groups = granularity.groups(x)
    hist, exponent = fused.state_dict()["hist"], fused.state_dict()["exponent"]
    _, width = fused.histogram()
    num_groups = groups.shape[0]
    times = {
        "torch path (collect)": cuda_median(lambda: reference.collect(x), 5, 1),
        "Triton kernel (collect)": cuda_median(lambda: fused.collect(x), 20),
        "Triton kernel alone (bf16 groups)": cuda_median(
            lambda: histogram_add_(hist, groups, exponent), 20
        ),
    }
    if num_groups == 1:
        times["Triton kernel alone, no private rows"] = cuda_median(
            lambda: histogram_add_(hist, groups, exponent, private=False), 10
        )
    default = kernel.PROGRAMS_PER_SM
    kernel.PROGRAMS_PER_SM = 16
    times["Triton kernel alone, 16 programs per SM"] = cuda_median(
        lambda: histogram_add_(hist, groups, exponent), 10
    )
    if num_groups == 1:
        times["Triton kernel alone, 16 programs per SM, private rows"] = cuda_median(
            lambda: histogram_add_(hist, groups, exponent, private=True), 10
        )
    kernel.PROGRAMS_PER_SM = default
    groups_f32 = groups.float()
    reps = 3 if num_groups > 1 else 10
    times[f"torch.histc per group ({num_groups} calls)"] = cuda_median(
        lambda: histc_per_group(groups_f32, width), reps, 1
    )
    floor = x.numel() * x.element_size() / copy * 1e3
    times["floor (bf16 bytes / copy rate)"] = floor
    torch_ms = times["torch path (collect)"]
    name = granularity.describe()
    return [
        f"| {name} | {path} | {ms:.3f} | {torch_ms / ms:.1f}x | {ms / floor:.1f}x |"
        for path, ms in times.items()
    ]


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(ROWS, COLS, device="cuda").to(torch.bfloat16)
    copy = copy_rate()
    rows = []
    for granularity in (PerTensor(), PerAxis(0), PerAxis(-1)):
        rows += bench(x, granularity, copy)
        torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(0)
    lines = [
        f"# Histogram update on CUDA ({datetime.date.today()}, {props.name}, "
        f"torch {torch.__version__}, triton {triton.__version__})",
        "",
        f"{ROWS} x {COLS} bf16 (standard normal), {BINS} bins (x2 signed) per group; median ms "
        "(CUDA events). Both collect paths give identical counts (checked).",
        f"Measured copy {copy / 1e12:.2f} TB/s (read + write); floor = bf16 bytes read / copy "
        "rate. per-axis(0) keeps 16384 x 4096 int64 counts (512 MiB) that the floor leaves out.",
        "",
        "| granularity | path | ms | vs torch path | vs floor |",
        "| --- | --- | ---: | ---: | ---: |",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    (out / f"histogram_kernel_{gpu_tag()}.md").write_text(text)


if __name__ == "__main__":
    main()
