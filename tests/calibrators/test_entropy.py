"""EntropyCalibrator against a float64 oracle of the same definition: a Python loop over windows
and quantized bins on the oracle's own histogram. Every window's KL must agree, and the chosen
window must be the oracle's (or tie with it to rounding)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from histogram_oracle import (
    collect_all,
    entropy_range,
    entropy_search,
    groups_of,
    histogram,
    make_batches,
)
from mlp import batches as mlp_batches
from mlp import make_mlp

from qcal_export.calibrators import CALIBRATORS, EntropyCalibrator, MaxCalibrator, entropy
from qcal_export.calibrators.entropy import _divergence, _first_admitted, _Sums, window_divergence
from qcal_export.errors import CalibrationError
from qcal_export.pipeline.calibrate import calibrate_onnx
from qcal_export.spec.formats import AMAX_FLOOR, FP8_E4M3, INT8, UINT8
from qcal_export.spec.granularity import PerAxis, PerTensor
from qcal_export.spec.recipe import Recipe, TensorSpec

FORMATS = {"int8": INT8, "fp8": FP8_E4M3, "uint8": UINT8}
GRANULARITIES = {"per-tensor": PerTensor(), "last-axis": PerAxis(-1)}
KL_RTOL, KL_ATOL = 1e-9, 1e-12


def check_against_oracle(cal, data, granularity, bins, quantized_bins):
    """Every window's KL as the oracle's; the chosen range the oracle's, up to a KL tie."""
    counts, width, amin, amax = histogram(groups_of(data, granularity), bins)
    assert np.array_equal(cal.histogram()[0].numpy(), counts)
    half, divergence = cal.compute_divergence()
    got_lo, got_hi = (t.numpy().reshape(-1) for t in cal.compute_range())
    for g in range(len(counts)):
        halves, kl = entropy_search(counts[g], quantized_bins, cal.max_clipped)
        assert np.array_equal(half.numpy(), halves)
        ours = divergence[g].numpy()
        assert np.array_equal(np.isinf(ours), np.isinf(kl))
        finite = np.isfinite(kl)
        assert np.allclose(ours[finite], kl[finite], rtol=KL_RTOL, atol=KL_ATOL)
        expected = entropy_range(
            counts[g],
            width[g],
            amin[g],
            amax[g],
            quantized_bins,
            cal.fmt.symmetric,
            cal.max_clipped,
        )
        chosen = int(np.argmin(ours)) if finite.any() else len(kl) - 1
        if (np.float32(got_lo[g]), np.float32(got_hi[g])) != tuple(np.float32(expected)):
            assert kl[chosen] <= kl[finite].min() + KL_ATOL + KL_RTOL * abs(kl[finite].min())


@pytest.mark.parametrize("kind", ["normal", "student-t", "outliers", "spiky"])
@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
@pytest.mark.parametrize("fmt_name", ["int8", "uint8"])
def test_search_equals_the_float64_oracle(fmt_name, gran_name, kind):
    fmt, granularity = FORMATS[fmt_name], GRANULARITIES[gran_name]
    data = make_batches(kind, seed=21, positive=fmt_name == "uint8")
    cal = collect_all(EntropyCalibrator(fmt, granularity, bins=96, quantized_bins=32), data)
    check_against_oracle(cal, data, granularity, 96, 32)


@pytest.mark.parametrize("quantized_bins", [2, 7, 33, 128])
def test_odd_and_extreme_quantized_bin_counts(quantized_bins):
    data = make_batches("outliers", seed=22)
    cal = collect_all(
        EntropyCalibrator(INT8, PerTensor(), bins=64, quantized_bins=quantized_bins), data
    )
    check_against_oracle(cal, data, PerTensor(), 64, quantized_bins)


def test_default_options_on_a_heavy_tailed_tensor():
    rng = np.random.default_rng(23)
    data = [rng.standard_t(3.0, size=(2, 4_000)).astype(np.float32) for _ in range(2)]
    cal = collect_all(EntropyCalibrator(INT8, PerTensor()), data)
    assert cal.bins == 2048 and cal.quantized_bins == 256 and cal.max_clipped == 1e-3
    check_against_oracle(cal, data, PerTensor(), 2048, 256)
    assert cal.compute_amax() < np.abs(np.concatenate(data)).max()


def test_fp8_uses_the_symmetric_rule():
    data = make_batches("student-t", seed=24)
    cal = collect_all(EntropyCalibrator(FP8_E4M3, PerAxis(-1), bins=64, quantized_bins=16), data)
    check_against_oracle(cal, data, PerAxis(-1), 64, 16)
    amin, amax = cal.compute_range()
    assert torch.equal(amin, -amax)


def test_asymmetric_range_is_the_threshold_clamped_to_min_and_max():
    data = make_batches("normal", seed=25, positive=True)
    cal = collect_all(EntropyCalibrator(UINT8, PerAxis(-1), bins=64, quantized_bins=16), data)
    amin, amax = cal.compute_range()
    observed_min, observed_max = cal.observed_range()
    assert torch.equal(amin, observed_min)  # -T is below the small negative minimum
    assert (amax <= observed_max).all() and (amax > 0).all()


def test_nan_and_inf_are_skipped():
    data = make_batches("outliers", seed=26)
    for d in data:
        d[1, :2, :] = np.nan
        d[2, 0, 0] = -np.inf
    cal = collect_all(EntropyCalibrator(UINT8, PerAxis(-1), bins=64, quantized_bins=16), data)
    assert cal.nonfinite_count == 4 * 13
    check_against_oracle(cal, data, PerAxis(-1), 64, 16)


def test_chunked_windows_and_groups_equal_one_chunk(monkeypatch):
    data = make_batches("student-t", seed=27, channels=40)
    cal = collect_all(EntropyCalibrator(INT8, PerAxis(-1), bins=128, quantized_bins=16), data)
    hist = cal.histogram()[0]
    half, whole = window_divergence(hist, 16)
    monkeypatch.setattr("qcal_export.calibrators.entropy.CHUNK_ELEMENTS", 4000)
    chunked = window_divergence(hist, 16)[1]
    assert torch.allclose(chunked, whole, rtol=1e-12, atol=0) and half[0] == 8


@pytest.mark.parametrize("max_clipped", [1e-3, 1.0])
def test_windows_left_unscored_are_the_ones_that_clip_too_much(max_clipped):
    """The narrow windows skipped (``_first_admitted``) are inf scored too; the rest equal
    one unskipped pass over every window."""
    data = make_batches("outliers", seed=5, channels=12)
    cal = collect_all(EntropyCalibrator(INT8, PerAxis(-1), bins=256, quantized_bins=16), data)
    hist = cal.histogram()[0]
    half, got = window_divergence(hist, 16, max_clipped)
    every = _divergence(_Sums.of(hist), half, 16, max_clipped)
    assert torch.equal(got.isinf(), every.isinf())
    assert torch.allclose(got, every, rtol=1e-12, atol=0)
    skipped = _first_admitted(_Sums.of(hist), half, max_clipped)
    assert (skipped > 0) == (max_clipped < 1) and got[:, :skipped].isinf().all()


@pytest.mark.parametrize("fmt", [INT8, UINT8], ids=["int8", "uint8"])
def test_zero_tensor_gives_a_floored_positive_amax(fmt):
    cal = EntropyCalibrator(fmt, PerAxis(0), bins=32, quantized_bins=8)
    cal.collect(torch.zeros(3, 5))
    amin, amax = cal.compute_range()
    assert torch.equal(amin, torch.zeros(3)) and torch.equal(amax, torch.zeros(3))
    assert ((cal.compute_amax() > 0) & (cal.compute_amax() <= AMAX_FLOOR)).all()


def test_single_value_and_single_window():
    cal = EntropyCalibrator(INT8, PerTensor(), bins=4, quantized_bins=8)
    cal.collect(torch.tensor([2.5, 2.5, 2.5]))
    half, divergence = cal.compute_divergence()
    assert half.tolist() == [4] and math.isfinite(divergence.item())
    reference = collect_all(MaxCalibrator(INT8, PerTensor()), [np.array([2.5], np.float32)])
    assert torch.equal(cal.compute_amax(), reference.compute_amax())


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"quantized_bins": 1}, "quantized_bins"),
        ({"quantized_bins": 129, "bins": 64}, "quantized_bins"),
        ({"quantized_bins": 16.5}, "quantized_bins"),
        ({"bins": 5000}, "bins"),
        ({"bins": 1}, "bins"),
        ({"max_clipped": 0}, "max_clipped"),
        ({"max_clipped": 1.5}, "max_clipped"),
        ({"max_clipped": "all"}, "max_clipped"),
    ],
)
def test_bad_options_are_rejected(options, name):
    with pytest.raises(CalibrationError, match=name):
        EntropyCalibrator(INT8, PerTensor(), **options)


def attention_probabilities(seed: int, spread: float) -> list[np.ndarray]:
    """Softmax rows of 64 over logits of standard deviation ``spread``: most values near 0, a
    few peaks near 1, as attention weights or a recognizer's character probabilities."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, spread, (2, 64, 16, 64))
    rows = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return list((rows / rows.sum(axis=-1, keepdims=True)).astype(np.float32))


def int8_cosine(x: np.ndarray, amax: float) -> float:
    """Cosine of ``x`` fake-quantized to int8 at ``amax`` against ``x`` (float64)."""
    x = x.astype(np.float64).ravel()
    step = amax / 127
    q = np.clip(np.round(x / step), -127, 127) * step
    return float(q @ x / np.linalg.norm(q) / np.linalg.norm(x))


@pytest.mark.parametrize("spread", [2.0, 3.0])
def test_attention_probabilities_are_not_clipped_to_their_bulk(spread):
    """Unbounded, KL prefers the window that resolves the near-zero mass and clips the peaks
    (threshold a few tenths, attention peaks cut); at most 1 value in 1000 may be clipped."""
    data = attention_probabilities(31, spread)
    x = np.concatenate([d.ravel() for d in data])
    bounded = collect_all(EntropyCalibrator(INT8, PerTensor(), bins=512, quantized_bins=64), data)
    check_against_oracle(bounded, data, PerTensor(), 512, 64)
    unbounded = collect_all(
        EntropyCalibrator(INT8, PerTensor(), bins=512, quantized_bins=64, max_clipped=1.0), data
    )
    check_against_oracle(unbounded, data, PerTensor(), 512, 64)
    loose, tight = float(unbounded.compute_amax()), float(bounded.compute_amax())
    assert loose < 0.3 and (x > loose).mean() > 1e-2
    assert (x > tight).mean() <= 1e-3 and tight > 0.6
    assert int8_cosine(x, tight) > 0.995 > 0.95 > int8_cosine(x, loose)


def test_default_window_models_int8_levels_on_each_side():
    """256 quantized bins over both sides: windows start at 128 bins each side, as TensorRT's."""
    data = attention_probabilities(32, 3.0)
    cal = collect_all(EntropyCalibrator(INT8, PerTensor()), data)
    half, _ = cal.compute_divergence()
    assert half[0] == 128 and half[-1] == 2048
    x = np.concatenate([d.ravel() for d in data])
    assert (x > float(cal.compute_amax())).mean() <= 1e-3


def test_registered_for_recipes():
    assert CALIBRATORS["entropy"] is EntropyCalibrator


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return make_mlp(tmp_path_factory.mktemp("mlp"), seq=False)


def test_calibrate_onnx_with_entropy_and_recipe_options(mlp):
    spec = TensorSpec(format="uint8", method="entropy", options={"bins": 256, "quantized_bins": 64})
    result = calibrate_onnx(
        mlp / "mlp.onnx", mlp / "data", recipe=Recipe(activation=spec), validate_batches=0
    )
    expected = collect_all(
        EntropyCalibrator(UINT8, PerTensor(), bins=256, quantized_bins=64), mlp_batches(mlp)
    )
    amin, amax = expected.compute_range()
    scales = result.scales["x"]
    assert scales.method == "entropy"
    assert torch.equal(scales.min, amin) and torch.equal(scales.max, amax)
    default = calibrate_onnx(mlp / "mlp.onnx", mlp / "data", method="entropy", validate_batches=0)
    assert all(s.method == "entropy" for s in default.scales.values() if s.kind == "activation")


def test_default_quantized_bins_fit_a_small_histogram():
    assert EntropyCalibrator(INT8, PerTensor(), bins=64).quantized_bins == 128
    assert EntropyCalibrator(INT8, PerTensor(), bins=200).quantized_bins == 256


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_divergence_is_the_host_one_in_any_chunks(monkeypatch):
    """On a GPU the windows go in larger chunks (``DEVICE_CHUNK_ELEMENTS``) and the sums run in
    another order: the host's KL up to the float64 rounding of terms of the order of
    ``log(count)`` (about 1e-14 each), in any chunks."""
    data = make_batches("student-t", seed=31, channels=40)
    cal = collect_all(EntropyCalibrator(INT8, PerAxis(-1), bins=128, quantized_bins=16), data)
    hist = cal.histogram()[0]
    half, host = window_divergence(hist, 16)
    whole = window_divergence(hist.cuda(), 16)[1].cpu()
    monkeypatch.setattr(entropy, "DEVICE_CHUNK_ELEMENTS", 1 << 12)  # 4 groups, 60 windows
    chunked = window_divergence(hist.cuda(), 16)[1].cpu()
    assert half[0] == 8 and torch.isfinite(host).any()
    for device in (whole, chunked):
        assert torch.equal(host.isinf(), device.isinf())
        finite = torch.isfinite(host)
        gap = float((device[finite] - host[finite]).abs().max())
        assert gap <= 1e-9, gap
