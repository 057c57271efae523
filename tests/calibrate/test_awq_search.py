"""AWQ's searches against a float64 brute force written plainly here: the factors
``mean|x|^alpha`` (centred), each alpha's joint output error of the layers sharing the input,
the chosen alpha never worse than alpha 0 (round-to-nearest) on any test layer, and the clip
search's per-block ratios."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qcal_export.calibrate.awq_search import (
    CLIP_RATIOS,
    AwqLayer,
    alpha_grid,
    awq_factors,
    clip_blocks,
    search_clip,
    search_scales,
)
from qcal_export.calibrate.tensor import calibrate_weight
from qcal_export.spec.granularity import PerAxis, PerBlock
from qcal_export.spec.recipe import TensorSpec


def plain_quantize(w: np.ndarray, fmt: str, block: int) -> np.ndarray:
    """Round-to-nearest of ``w`` ``[K, N]`` with max scales per block of ``block`` rows of a
    column (float64): int4/int8 symmetric, uint4 with a zero point."""
    out = np.empty_like(w)
    for start in range(0, w.shape[0], block):
        part = w[start : start + block]
        if fmt == "uint4":
            lo, hi = np.minimum(part.min(axis=0), 0), np.maximum(part.max(axis=0), 0)
            scale = (hi - lo) / 15
            zero = np.round(-lo / scale)
            q = np.clip(np.round(part / scale) + zero, 0, 15)
            out[start : start + block] = (q - zero) * scale
        else:
            qmax = 7 if fmt == "int4" else 127
            scale = np.abs(part).max(axis=0) / qmax
            q = np.clip(np.round(part / scale), -qmax - 1, qmax)
            out[start : start + block] = q * scale
    return out


def plain_error(x, weights, fmt, block, mean_abs, alpha) -> float:
    """``sum ||X W - (X / s) Q(s W)||²`` over the layers, every step in float64 (but ``s W``
    rounded to float32, as the model stores it)."""
    m = mean_abs**alpha
    s = m / math.sqrt(m.max() * m.min())
    total = 0.0
    for w in weights:
        scaled = (w.astype(np.float64) * s[:, None]).astype(np.float32).astype(np.float64)
        diff = (x / s) @ plain_quantize(scaled, fmt, block) - x @ w.astype(np.float64)
        total += float((diff**2).sum())
    return total


def outlier_input(rows: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (rows, k))
    x[:, rng.choice(k, 4, replace=False)] *= 30
    return x


def layers_for(weights, fmt, block, gemm=False):
    """AwqLayers of ``[K, N]`` weights: MatMul layout, or Gemm transB (``[N, K]``)."""
    spec = TensorSpec(format=fmt, method="awq", per_channel=True, block_size=block)
    found = []
    for i, w in enumerate(weights):
        if fmt == "int8":
            granularity = PerAxis(0 if gemm else 1)
        else:
            granularity = PerBlock(1 if gemm else 0, block)
        found.append(
            AwqLayer(f"w{i}", w.T.copy() if gemm else w, 1 if gemm else 0, spec, granularity)
        )
    return found


CASES = [("int4", 32, False), ("int4", 16, True), ("uint4", 32, False), ("int8", None, False)]


@pytest.mark.parametrize(("fmt", "block", "gemm"), CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_search_matches_the_brute_force(fmt, block, gemm, seed):
    k, n = 64, 48
    rng = np.random.default_rng(100 + seed)
    x = outlier_input(96, k, seed)
    weights = [(rng.normal(0, 1, (k, n)) / 8).astype(np.float32) for _ in range(3)]
    mean_abs = np.abs(x).mean(axis=0)
    layers = layers_for(weights, fmt, block or k, gemm)
    choice = search_scales(mean_abs, x, layers, 20, "skip")
    plain = [plain_error(x, weights, fmt, block or k, mean_abs, a) for a in alpha_grid(20)]
    np.testing.assert_allclose(choice.errors, plain, rtol=1e-4)
    assert choice.alpha == alpha_grid(20)[int(np.argmin(plain))]
    chosen = plain_error(x, weights, fmt, block or k, mean_abs, choice.alpha)
    assert chosen <= plain[0]
    for w in weights:  # each layer alone, too: its own search never loses to alpha 0
        alone = search_scales(mean_abs, x, layers_for([w], fmt, block or k, gemm), 20, "skip")
        assert plain_error(x, [w], fmt, block or k, mean_abs, alone.alpha) <= plain_error(
            x, [w], fmt, block or k, mean_abs, 0.0
        )


@pytest.mark.parametrize(("fmt", "block", "gemm"), [*CASES, ("uint4", 32, True)], ids=str)
def test_block_view_quantizes_as_the_export(fmt, block, gemm):
    """The search's block-view Q equals calibrate_weight's scales and fake_quant_weight on the
    graph layout, bit for bit (a partial last block, a zero column, negative-only blocks)."""
    rng = np.random.default_rng(4)
    w = rng.normal(0, 1, (70, 9)).astype(np.float32)
    w[:, 2] = 0.0
    w[:, 3] = -np.abs(w[:, 3])
    (layer,) = layers_for([w], fmt, block or 70, gemm)
    fast = layer.quantized(w, "skip")
    values = torch.from_numpy(layer.canonical(w).copy())
    spec = TensorSpec(format=fmt, method="max", per_channel=True, block_size=block)
    scales = calibrate_weight("w", values, spec, layer.granularity, "skip")
    expected = layer.canonical(scales.fake_quant_weight(values).double().numpy())
    np.testing.assert_array_equal(fast, expected)


def test_factors_are_the_formula_and_alpha_zero_is_one():
    mean_abs = np.array([0.5, 2.0, 8.0, 1e-9])
    np.testing.assert_array_equal(awq_factors(mean_abs, 0.0), np.ones(4))
    m = np.maximum(mean_abs, 1e-5) ** 0.5
    np.testing.assert_allclose(awq_factors(mean_abs, 0.5), m / math.sqrt(m.max() * m.min()))
    assert alpha_grid(20)[0] == 0.0 and alpha_grid(20)[-1] == 1.0 and len(alpha_grid(20)) == 20


def test_clip_blocks_clamps_each_block_to_its_ratio():
    w = np.array([[1.0, -4.0], [-2.0, 1.0], [3.0, 0.5], [0.5, 2.0], [1.0, 1.0]])
    ratios = np.array([[0.5, 1.0], [1.0, 0.5], [0.5, 0.5]])
    clipped = clip_blocks(w, ratios, 2)
    expected = np.array([[1.0, -4.0], [-1.0, 1.0], [3.0, 0.5], [0.5, 1.0], [0.5, 0.5]])
    np.testing.assert_array_equal(clipped, expected)


@pytest.mark.parametrize(("fmt", "block"), [("int4", 32), ("uint4", 16), ("int8", None)])
def test_clip_search_matches_the_brute_force(fmt, block):
    k, n = 64, 12
    rng = np.random.default_rng(5)
    x = outlier_input(80, k, 3)
    w = rng.standard_t(3, (k, n)).astype(np.float32) / 8
    (layer,) = layers_for([w], fmt, block or k)
    ratios, before, after = search_clip(x, layer, block or k, "skip")
    size = block or k
    best = np.ones_like(ratios)
    for b in range(ratios.shape[0]):
        rows = slice(b * size, (b + 1) * size)
        for j in range(n):
            errors = []
            for r in CLIP_RATIOS:
                part = w[rows, j : j + 1].astype(np.float64)
                bound = r * np.abs(part).max()
                q = plain_quantize(np.clip(part, -bound, bound), fmt, size)
                errors.append(float(((x[:, rows] @ (part - q)) ** 2).sum()))
            best[b, j] = CLIP_RATIOS[int(np.argmin(errors))]
    assert (ratios != best).mean() < 0.02  # float32 vs float64 rounding may flip a near tie
    exact = x @ w.astype(np.float64)
    plain_before = float(((x @ plain_quantize(w.astype(np.float64), fmt, size) - exact) ** 2).sum())
    clipped = plain_quantize(clip_blocks(w.astype(np.float64), best, size), fmt, size)
    plain_after = float(((x @ clipped - exact) ** 2).sum())
    assert np.isclose(before, plain_before, rtol=1e-4)
    assert np.isclose(after, plain_after, rtol=0.05)
    assert after < before  # blocks are scored alone; on these layers the whole error drops too
