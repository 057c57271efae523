"""Method auto's race against scoring every candidate on every sample, on the demo model.

Every distinct candidate of every scored activation (int8 W8A8 at the ``ort`` placement, the
candidates the demo's calibration finds) is scored through the gated sessions on each of the
first ``--samples`` calibration samples alone. From those errors each policy is replayed: which
candidates it scores on which samples, and what it picks. Per policy: the runs and sample-runs
it costs, and its regret against the choice on all ``--samples`` samples: the extra squared
output error of its picks, summed over the activations, as a share of the least (squared errors
of activations quantized one at a time add up to about the model's), and the activations
whose pick differs. Not a test; run it by hand:

    python benchmarks/bench_auto_race.py [--samples 16] [--output F] [--errors E.npz]

``--errors E.npz`` keeps the scored errors (read back where the file exists).

The table is printed and written to ``benchmarks/results/accuracy_steps_auto_racing.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import harness
import numpy as np
from bench_accuracy_steps import tokenized

from qcal_export.analysis import auto_race, method_choice
from qcal_export.analysis.auto_candidates import exact_constants, first_equal, scale_feed
from qcal_export.analysis.auto_samples import first_samples
from qcal_export.capture.data import model_inputs
from qcal_export.demo.model import demo_model_path
from qcal_export.graphs.gated import GATE
from qcal_export.graphs.suffix import upstream_reads
from qcal_export.pipeline import steps
from qcal_export.pipeline.calibrate import calibrate_onnx

RESULT_FILE = Path(__file__).resolve().parent / "results" / "accuracy_steps_auto_racing.md"


class Scored(Exception):
    """Stops the calibration once every candidate is scored."""


def every_error(samples: int) -> list[np.ndarray]:
    """Per scored activation (in scoring order), ``[samples, candidates]`` squared output
    errors of its distinct candidates, each of the first ``samples`` samples scored alone: the
    demo's calibration runs up to its method choice, which ``score_apart`` takes over."""
    found: list[np.ndarray] = []

    def score(planned, source, scales, candidates, _samples):
        views = first_samples(source, model_inputs(planned.model), samples)
        ones = [
            {k: v[i : i + 1] for k, v in view.items()}
            for view in views
            for i in range(len(view["input_ids"]))
        ]
        found.extend(score_apart(planned, scales, candidates, ones))
        raise Scored

    steps.choose_activation_methods = score
    with tempfile.TemporaryDirectory() as folder, contextlib.suppress(Scored):
        calibrate_onnx(
            demo_model_path(),
            tokenized()[0],
            output=Path(folder) / "auto.onnx",
            format="int8",
            method="auto",
            weight_method="max",
            validate_batches=0,
        )
    return found


def score_apart(planned, scales, candidates, ones: list[dict]) -> list[np.ndarray]:
    """The errors of ``every_error``, per activation of ``candidates`` that is scored, through
    ``method_choice``'s gated sessions on each of ``ones``."""
    exact = exact_constants(planned.model.graph, candidates)
    order = [t for t in candidates if t not in exact]
    per = method_choice.GATES_PER_SESSION
    gateds = [
        method_choice.gated_model(planned, scales, set(order[k : k + per]))
        for k in range(0, len(order), per)
    ]
    upstream = sorted({n for g in gateds for n in upstream_reads(g.model, [GATE])})
    floats = method_choice.float_runs(planned, ones, upstream)
    workers, threads = method_choice.scoring_workers(planned.providers)
    found = []
    with ThreadPoolExecutor(workers) as pool:
        for gated in gateds:
            runs = method_choice.GatedRuns(gated, planned, floats, threads)
            for tensor in gated.tensors:
                feeds = {
                    m: scale_feed(s, gated.scales[tensor], runs.inits)
                    for m, s in candidates[tensor].items()
                }
                opened = [(tensor, feeds[m]) for m in dict.fromkeys(first_equal(feeds).values())]
                rows = [
                    runs.errors(feed, up, out, opened, pool)
                    for feed, up, out in zip(ones, floats.upstream, floats.outputs, strict=True)
                ]
                found.append(np.array(rows))
    return found


def replay(errors: list[np.ndarray], stages: list[int], margin, indifference: float):
    """(picks, runs, sample-runs) of races over ``stages`` (samples per stage) run as
    ``method_choice`` runs them, ``GATES_PER_SESSION`` activations at a time: ``margin(n)``
    after ``n`` samples, deciding an activation where the candidates left differ by at most
    ``indifference`` of the typical least error per sample (``auto_race.Race``)."""
    picks, runs, sample_runs, finished = [], 0, 0, []
    per = method_choice.GATES_PER_SESSION
    for first in range(0, len(errors), per):
        session = errors[first : first + per]
        total = [np.zeros(e.shape[1]) for e in session]
        count = [np.zeros(e.shape[1], dtype=int) for e in session]
        alive = [list(range(e.shape[1])) for e in session]
        begin = 0
        for size in stages:
            for e, t, c, a in zip(session, total, count, alive, strict=True):
                t[a] += e[begin : begin + size, a].sum(axis=0)
                c[a] += size
                runs, sample_runs = runs + len(a), sample_runs + len(a) * size
            begin += size
            least = [np.min(t[c > 0] / c[c > 0]) for t, c in zip(total, count, strict=True)]
            typical = np.mean(finished + least)
            for k, (t, a) in enumerate(zip(total, alive, strict=True)):
                if not a:
                    continue
                best = t[a].min()
                kept = [j for j in a if t[j] <= (1 + margin(begin)) * best]
                spread = t[kept].max() - best
                tied = begin >= auto_race.MIN_TIED and spread <= indifference * typical * begin
                alive[k] = kept if len(kept) > 1 and not tied else []
        finished += least
        for t, c in zip(total, count, strict=True):
            finalists = np.flatnonzero(c == c.max())
            picks.append(int(finalists[np.argmin(t[finalists])]))
    return picks, runs, sample_runs


def doubling(samples: int) -> list[int]:
    """Stages of 1, 1, 2, 4... samples, the last what is left (``sample_stages``)."""
    stages, taken = [], 0
    while taken < samples:
        stages.append(min(max(1, taken), samples - taken))
        taken += stages[-1]
    return stages


def policies(scored: int) -> dict[str, tuple]:
    """Name -> (samples per stage, margin(n), indifference) over ``scored`` samples."""
    half = (scored + 1) // 2
    race = lambda n: auto_race.SCREEN_MARGIN / math.sqrt(n)  # noqa: E731
    return {
        "every candidate, every sample": ([scored], lambda n: math.inf, 0.0),
        "two halves, 30% margin (before)": ([half, scored - half], lambda n: 0.3, 0.0),
        "race, no indifference": (doubling(scored), race, 0.0),
        f"race, indifference {auto_race.INDIFFERENCE} (now)": (
            doubling(scored), race, auto_race.INDIFFERENCE,
        ),
    }  # fmt: skip


def table(errors: list[np.ndarray], samples: int) -> list[str]:
    """The rows of every policy over the first 4 samples and over 8 (those of ``samples`` at
    most), against all ``samples``."""
    truth = [e.sum(axis=0) for e in errors]
    least = sum(t.min() for t in truth)
    lines = [
        "| samples scored | policy | runs | sample-runs | regret | picks unlike all "
        f"{samples} samples' |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for scored in [n for n in (4, 8) if n <= samples]:
        for name, (stages, margin, indifference) in policies(scored).items():
            firsts = [e[:scored] for e in errors]
            picks, runs, sample_runs = replay(firsts, stages, margin, indifference)
            extra = sum(t[p] - t.min() for t, p in zip(truth, picks, strict=True))
            unlike = sum(p != int(np.argmin(t)) for t, p in zip(truth, picks, strict=True))
            lines.append(
                f"| {scored} | {name} | {runs} | {sample_runs} | {extra / least:.4f} | {unlike} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--output", type=Path, default=RESULT_FILE)
    parser.add_argument("--errors", type=Path, help="the scored errors: saved here, or read")
    args = parser.parse_args()
    if args.errors and args.errors.exists():
        with np.load(args.errors) as saved:
            errors = [saved[str(k)] for k in range(len(saved.files))]
    else:
        errors = every_error(args.samples)
        if args.errors:
            np.savez(args.errors, **{str(k): e for k, e in enumerate(errors)})
    versions = harness.versions()
    lines = [
        "# Method auto: the race against every candidate on every sample (demo, int8 W8A8)",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; {os.cpu_count()} cores; "
        + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- {len(errors)} scored activations, {sum(e.shape[1] for e in errors)} distinct "
        f"candidates, each scored on each of the first {args.samples} calibration samples alone",
        "- regret: the extra squared output error of the picks over the least, summed over the "
        f"activations, as a share of the least (truth: all {args.samples} samples)",
        "",
        *table(errors, args.samples),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
