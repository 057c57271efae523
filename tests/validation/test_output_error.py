"""The one output-error accumulator against a float64 brute force: every batch's outputs
flattened and concatenated, NaN and inf left out where either model has them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qcal_export.validation.output_error import ErrorTally


def brute_force(refs: list[np.ndarray], cands: list[np.ndarray]) -> dict[str, float]:
    """One output's error over all batches at once, in float64, from the definitions."""
    r = np.concatenate([np.asarray(x, np.float64).ravel() for x in refs])
    c = np.concatenate([np.asarray(x, np.float64).ravel() for x in cands])
    finite = np.isfinite(r) & np.isfinite(c)
    nonfinite_float = int(np.sum(~np.isfinite(r)))
    nonfinite_quantized = int(np.sum(np.isfinite(r) & ~np.isfinite(c)))
    r, c = r[finite], c[finite]
    d = c - r
    norm_r, norm_c, norm_d = (math.sqrt(math.fsum(v * v)) for v in (r, c, d))
    return {
        "max_abs": float(np.max(np.abs(d), initial=0.0)),
        "rel_l2": norm_d / norm_r if norm_r else norm_d,
        "cosine": math.fsum(r * c) / (norm_r * norm_c) if norm_r * norm_c else float(norm_d == 0),
        "nonfinite_float": nonfinite_float,
        "nonfinite_quantized": nonfinite_quantized,
    }


def batches(seed: int, count: int) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """``count`` batches of two float32 outputs (shapes [n, 3, 4] and [n]), the candidate a
    noisy copy with a few NaN and inf in either model's values."""
    rng = np.random.default_rng(seed)
    refs, cands = [], []
    for _ in range(count):
        rows = int(rng.integers(1, 5))
        ref = [rng.standard_normal((rows, 3, 4)) * 10, rng.standard_normal(rows)]
        cand = [x + rng.standard_normal(x.shape) * 0.1 for x in ref]
        ref, cand = [x.astype(np.float32) for x in ref], [x.astype(np.float32) for x in cand]
        ref[0].flat[int(rng.integers(ref[0].size))] = rng.choice([np.nan, np.inf, -np.inf])
        cand[0].flat[int(rng.integers(cand[0].size))] = rng.choice([np.nan, np.inf])
        refs.append(ref)
        cands.append(cand)
    return refs, cands


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_output_and_worst_equal_the_brute_force_over_several_batches(seed):
    refs, cands = batches(seed, count=5)
    tally = ErrorTally(["a", "b"])
    for ref, cand in zip(refs, cands, strict=True):
        tally.add(ref, cand)
    assert tally.batches == 5
    got = tally.per_output()
    for k, name in enumerate(["a", "b"]):
        want = brute_force([r[k] for r in refs], [c[k] for c in cands])
        assert got[name] == pytest.approx(want, rel=1e-12, abs=0), name
    assert got["a"]["nonfinite_float"] + got["a"]["nonfinite_quantized"] >= 5
    assert tally.worst() == {
        "cosine": min(got["a"]["cosine"], got["b"]["cosine"]),
        "rel_l2": max(got["a"]["rel_l2"], got["b"]["rel_l2"]),
    }


def test_nonfinite_elements_are_left_out_and_counted_by_hand():
    """Of [1, inf, 2, 3, nan] against [1.5, inf, nan, 3, 7], the float model's inf and nan and
    the quantized model's own nan are left out; the sums run over (1, 1.5), (3, 3)."""
    tally = ErrorTally(["y"])
    tally.add(
        [np.array([1.0, np.inf, 2.0, 3.0, np.nan], np.float32)],
        [np.array([1.5, np.inf, np.nan, 3.0, 7.0], np.float32)],
    )
    summary = tally.per_output()["y"]
    assert summary["nonfinite_float"] == 2
    assert summary["nonfinite_quantized"] == 1
    assert summary["max_abs"] == 0.5
    assert summary["rel_l2"] == pytest.approx(0.5 / np.sqrt(10.0), rel=1e-15)
    assert summary["cosine"] == pytest.approx(10.5 / np.sqrt(10.0 * 11.25), rel=1e-15)


def test_cosine_is_over_the_whole_output_not_a_mean_of_its_samples():
    """Rows (3, 4) -> (3, 4) and (1, 0) -> (0, 1): one cosine of the flattened output, 25 / 26
    (the mean of the rows' cosines would be 0.5); rel L2 sqrt(2 / 26)."""
    tally = ErrorTally(["y"])
    tally.add([np.array([[3.0, 4.0], [1.0, 0.0]])], [np.array([[3.0, 4.0], [0.0, 1.0]])])
    assert tally.worst() == {"cosine": 25 / 26, "rel_l2": pytest.approx(math.sqrt(2 / 26))}


def test_zero_outputs_and_no_output():
    tally = ErrorTally(["same", "apart"])
    tally.add([np.zeros(3), np.zeros(2)], [np.zeros(3), np.array([3.0, 4.0])])
    got = tally.per_output()
    assert (got["same"]["cosine"], got["same"]["rel_l2"]) == (1.0, 0.0)
    assert (got["apart"]["cosine"], got["apart"]["rel_l2"]) == (0.0, 5.0)
    assert ErrorTally([]).worst() == {"cosine": 1.0, "rel_l2": 0.0}
