"""Ours vs Model Optimizer's MseCalibrator and llmcompressor's MSE observer on CPU: time and amax.

Same tensors on both sides (float32, made here from a seed): two activations with outlier
channels, per tensor, and a weight, per output channel (axis 0). Two comparisons:

- ``MseCalibrator`` (multiplier sweep) vs ModelOpt's ``modelopt.torch.quantization.calib.
  MseCalibrator`` with ModelOpt's own fake quantization as ``quant_func`` (``fake_tensor_quant``
  for int8, ``scaled_e4m3`` for fp8) and its default grid. ModelOpt's candidates are
  ``linspace(start, stop, ceil((stop - start) / step) + 1)``: with 0.25, 4.0, 0.1 that is 39
  multipliers 0.0987 apart, ending at 4.0. Ours are ``start + i * step`` (0.25 .. 4.05 with the
  same options), so ours get ``step = (stop - start) / 38``: the same 39 multipliers.
- ``ShrinkMseCalibrator`` vs llmcompressor's ``MovingAverageMSEObserver`` (``observer="mse"``)
  with the same options (maxshrink 0.2, grid 100, norm 2.4, patience 5), one batch (so the
  moving average does not enter).

Each side starts from a fresh calibrator per repetition; the initial amax (the abs-max, the
same tensor for both) is outside the timing. Not a test; run it by hand:

    python benchmarks/bench_cpu_peers.py [--quick] [--threads 2] [--repeats 3]

Peers are optional (``pip install -e '.[bench-peers]'``); a missing one is named and only our
rows run. The table is printed and written to ``benchmarks/results/cpu_peers.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cpu_peers import (
    FORMATS,
    MODELOPT_GRID,
    SHRINK_OPTIONS,
    Case,
    llmc_shrink,
    load_llmc_observer,
    load_modelopt,
    modelopt_mse,
)
from cpu_peers_report import render, rule_lines, table

from qcal_export.calibrators import MseCalibrator, ShrinkMseCalibrator
from qcal_export.spec.formats import AMAX_FLOOR, Format, IntFormat
from qcal_export.spec.granularity import PerAxis, PerTensor

RESULT_FILE = Path(__file__).resolve().parent / "results" / "cpu_peers.md"
SAME = 1e-6
"""Relative amax difference below which a group counts as agreeing (float32 ulps differ)."""


@dataclass(frozen=True)
class HalfStepInt(IntFormat):
    """Symmetric int with compressed-tensors' scale rule ``amax / ((qmax - qmin) / 2)``
    (127.5 for int8, ours: 127): a diagnostic that isolates the search from the scale rule."""

    def scale_zero_point(
        self, amin: torch.Tensor, amax: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bound = torch.maximum(amin.abs(), amax.abs()).to(torch.float32).clamp_min(AMAX_FLOOR)
        return bound / ((self.qmax - self.qmin) / 2), torch.zeros_like(bound)


MODELOPT_CASES = [
    Case(tensor, fmt, tensor == "weight")
    for tensor in ("act-square", "act-tall", "weight")
    for fmt in ("int8", "fp8")
]
LLMC_CASES = [
    Case("act-square", "int8", False),
    Case("act-square", "int8-asym", False),
    Case("act-square", "fp8", False),
    Case("act-tall", "int8", False),
    Case("act-tall", "fp8", False),
    Case("weight", "int8", True),
    Case("weight", "fp8", True),
]


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def make_tensors(quick: bool) -> dict[str, torch.Tensor]:
    """Activations ``[tokens, hidden]`` with outlier channels and spikes; a weight ``[out, in]``
    with per-row spread and a few large entries. Float32, seed 0."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"act-square": (4096, 4096), "act-tall": (16384, 1024), "weight": (4096, 4096)}
    if quick:
        shapes = {"act-square": (1024, 1024), "act-tall": (4096, 256), "weight": (1024, 1024)}
    tensors = {}
    for name, (rows, cols) in shapes.items():
        x = torch.randn(rows, cols, generator=gen)
        spikes = torch.rand(rows, cols, generator=gen) < 1e-4
        if name == "weight":
            x *= 0.02 * torch.exp(0.5 * torch.randn(rows, 1, generator=gen))
            x[spikes] *= 8
        else:
            channels = torch.randperm(cols, generator=gen)[: max(1, cols // 200)]
            x[:, channels] *= 20
            x[spikes] *= 40
        tensors[name] = x.contiguous()
    return tensors


def initial_amax(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Abs-max per tensor ``[]`` or per row ``[rows]``: the range both sweeps multiply."""
    return x.abs().amax(dim=1) if per_channel else x.abs().amax()


# --------------------------------------------------------------------------------------------
# The two sides of each comparison (the peers' in cpu_peers.py)
# --------------------------------------------------------------------------------------------


def ours_mse(x: torch.Tensor, case: Case, amax0: torch.Tensor) -> torch.Tensor:
    """Our multiplier sweep on ModelOpt's 39 candidates; amax ``[G]``."""
    start, stop, step = (MODELOPT_GRID[k] for k in MODELOPT_GRID)
    count = math.ceil((stop - start) / step) + 1
    granularity = PerAxis(0) if case.per_channel else PerTensor()
    cal = MseCalibrator(
        FORMATS[case.fmt],
        granularity,
        amax0=amax0,
        start=start,
        stop=stop,
        step=(stop - start) / (count - 1),
    )
    cal.collect(x)
    return cal.compute_amax().reshape(-1)


def ours_shrink(x: torch.Tensor, case: Case, fmt: Format | None = None) -> torch.Tensor:
    """Our shrink search; ``[G]`` amax (symmetric) or ``[2, G]`` min and max (asymmetric)."""
    fmt = fmt or FORMATS[case.fmt]
    granularity = PerAxis(0) if case.per_channel else PerTensor()
    cal = ShrinkMseCalibrator(fmt, granularity, **SHRINK_OPTIONS)
    cal.collect(x)
    amin, amax = cal.compute_range()
    if fmt.symmetric:
        return amax.reshape(-1)
    return torch.stack([amin.reshape(-1), amax.reshape(-1)])


# --------------------------------------------------------------------------------------------
# Measuring and comparing
# --------------------------------------------------------------------------------------------


def warm_up(modelopt: bool, observer: type | None) -> None:
    """One small call of every path, so that no timed call pays first-call costs."""
    x = make_tensors(quick=True)["act-tall"][:256]
    for case in {Case("act-tall", fmt, per_channel) for fmt in FORMATS for per_channel in (0, 1)}:
        amax0 = initial_amax(x, case.per_channel)
        ours_shrink(x, case)
        if observer is not None:
            llmc_shrink(x, case, observer)
        if case.fmt != "int8-asym":
            ours_mse(x, case, amax0)
            if modelopt:
                modelopt_mse(x, case, amax0)


def timed(run: Callable[[], torch.Tensor], repeats: int) -> tuple[float, float, torch.Tensor]:
    """Median wall and median process CPU time of ``repeats`` calls, seconds, and the last
    call's result. CPU time is the work of all torch threads; with one thread it is what the
    wall time would be on an idle core."""
    wall, cpu = [], []
    for _ in range(repeats):
        begin, begin_cpu = time.perf_counter(), time.process_time()
        result = run()
        wall.append(time.perf_counter() - begin)
        cpu.append(time.process_time() - begin_cpu)
    return statistics.median(wall), statistics.median(cpu), result


def agreement(ours: torch.Tensor, peer: torch.Tensor) -> tuple[float, int, int]:
    """Largest relative difference, groups (or bounds) that differ by more than ``SAME``, all."""
    ours, peer = ours.double().reshape(-1), peer.double().reshape(-1)
    relative = (ours - peer).abs() / peer.abs().clamp_min(AMAX_FLOOR)
    return float(relative.max()), int((relative > SAME).sum()), relative.numel()


def upper(result: torch.Tensor) -> torch.Tensor:
    """The amax ``[G]`` of a symmetric result, the max bound of an asymmetric ``[2, G]`` one."""
    return result[1] if result.ndim == 2 else result


def multipliers(amax: torch.Tensor, amax0: torch.Tensor) -> str:
    """The chosen amax over the initial one: the value per tensor, the range per channel."""
    ratio = amax.double().reshape(-1) / amax0.double().reshape(-1)
    if ratio.numel() == 1:
        return f"{float(ratio):.4f}"
    return f"{float(ratio.min()):.3f}..{float(ratio.max()):.3f}"


def measure(
    case: Case,
    x: torch.Tensor,
    ours: Callable[[], torch.Tensor],
    peer: Callable[[], torch.Tensor] | None,
    amax0: torch.Tensor,
    repeats: int,
) -> dict[str, Any]:
    """Time both sides of one row and compare what they chose."""
    row: dict[str, Any] = {"case": case, "shape": tuple(x.shape)}
    row["ours_s"], row["ours_cpu"], row["ours"] = timed(ours, repeats)
    row["ours_m"] = multipliers(upper(row["ours"]), amax0)
    if peer is not None:
        row["peer_s"], row["peer_cpu"], row["peer"] = timed(peer, repeats)
        row["peer_m"] = multipliers(upper(row["peer"]), amax0)
        row["diff"], row["differ"], row["groups"] = agreement(row["ours"], row["peer"])
    return row


def run_modelopt(tensors: dict, available: bool, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for case in MODELOPT_CASES:
        x = tensors[case.tensor]
        amax0 = initial_amax(x, case.per_channel)
        peer = (lambda x=x, c=case, a=amax0: modelopt_mse(x, c, a)) if available else None
        rows.append(
            measure(case, x, lambda x=x, c=case, a=amax0: ours_mse(x, c, a), peer, amax0, repeats)
        )
        print(progress("modelopt", rows[-1]), flush=True)
    return rows


def run_llmc(tensors: dict, observer: type | None, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for case in LLMC_CASES:
        x = tensors[case.tensor]
        amax0 = initial_amax(x, case.per_channel)
        if not FORMATS[case.fmt].symmetric:
            amax0 = x.amax().clamp(min=0)  # the asymmetric rows show the max bound over the max
        peer = (lambda x=x, c=case: llmc_shrink(x, c, observer)) if observer else None
        rows.append(measure(case, x, lambda x=x, c=case: ours_shrink(x, c), peer, amax0, repeats))
        if observer is not None and case.fmt == "int8":
            # The same search under compressed-tensors' scale rule: what is left is the search.
            half = HalfStepInt(bits=8, signed=True, symmetric=True)
            rule = ours_shrink(x, case, half)
            rows[-1]["rule_diff"], rows[-1]["rule_differ"], _ = agreement(rule, rows[-1]["peer"])
        print(progress("llmcompressor", rows[-1]), flush=True)
    return rows


def progress(peer: str, row: dict[str, Any]) -> str:
    case = row["case"]
    line = f"{peer:13} {case.tensor:10} {case.fmt:9} {case.granularity:11} "
    line += f"ours {row['ours_s']:.2f} s (cpu {row['ours_cpu']:.2f})"
    if "peer_s" in row:
        line += f", peer {row['peer_s']:.2f} s (cpu {row['peer_cpu']:.2f}), "
        line += f"amax max rel diff {row['diff']:.1e}"
    return line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small tensors, one repetition")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (1: on a shared 2-core machine, 2 threads made every row "
        "several times slower and erratic, a parallel op waiting for a descheduled thread)",
    )
    parser.add_argument("--repeats", type=int, help="timed calls per side (3; --quick: 1)")
    parser.add_argument(
        "--peers",
        nargs="+",
        choices=("modelopt", "llmcompressor"),
        default=None,
        help="which comparisons to run (both)",
    )
    parser.add_argument(
        "--output", type=Path, help=f"result file (default {RESULT_FILE}; none with --quick)"
    )
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.peers = args.peers or ["modelopt", "llmcompressor"]
    if args.output is None and not args.quick:
        args.output = RESULT_FILE
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    notes, sections = {}, []
    available, observer = False, None
    if "modelopt" in args.peers:
        available, notes["ModelOpt"] = load_modelopt()
        if not available:
            print(f"peer missing: {notes['ModelOpt']}; our rows only", flush=True)
    if "llmcompressor" in args.peers:
        observer, notes["llmcompressor"] = load_llmc_observer()
        if observer is None:
            print(f"peer missing: {notes['llmcompressor']}; our rows only", flush=True)
    warm_up(available, observer)
    args.load_before = os.getloadavg()[0]
    tensors = make_tensors(args.quick)
    if "modelopt" in args.peers:
        rows = run_modelopt(tensors, available, args.repeats)
        title = "## MseCalibrator vs ModelOpt MseCalibrator (39 multipliers 0.25 .. 4.0)"
        sections.append((title, table(rows, "ModelOpt")))
    if "llmcompressor" in args.peers:
        rows = run_llmc(tensors, observer, args.repeats)
        title = (
            "## ShrinkMseCalibrator vs llmcompressor MSE observer "
            "(maxshrink 0.2, grid 100, norm 2.4, patience 5)"
        )
        sections.append((title, table(rows, "llmc") + rule_lines(rows)))
    args.load_after = os.getloadavg()[0]
    report = render(args, notes, sections)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
