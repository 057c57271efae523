"""AWQ's searches for the layers that read one activation ``X``: per input channel factors
``s = mean|X|^alpha`` (alpha on a grid in [0, 1]) minimising the layers' joint output error
``sum ||X W - (X / s) Q(s W)||²`` on a sample of ``X``'s rows, then, optionally, per weight
block the clip ratio ``r`` (the block max shrunk to ``r`` times itself) that minimises the
block's share of that error.

``Q`` is the weight's own export (format, granularity, max scales: ``calibrate_weight``);
alpha 0 gives ``s = 1``, plain round-to-nearest, so the choice is never worse than it on the
sample. Shapes: ``X`` rows ``[T, K]``; a weight ``[K, N]`` (MatMul) or ``[N, K]`` (Gemm
transB), turned ``[K, N]`` ("canonical") to multiply.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from qcal_export.calibrate.tensor import calibrate_weight
from qcal_export.spec.formats import SCALE_FLOOR, IntFormat, get_format
from qcal_export.spec.granularity import Granularity, PerAxis, PerBlock
from qcal_export.spec.methods import MAX
from qcal_export.spec.recipe import TensorSpec

CHANNEL_FLOOR = 1e-5
"""A channel's mean |x| is taken at least this (a dead channel would give a factor of 0)."""
CLIP_RATIOS = 1.0 - np.arange(10) / 20
"""The clip search's ratios of a block's max: 1 (no clip) down to 0.55, as AWQ's own."""
CHUNK_ELEMENTS = 1 << 24
"""Most float64 elements of one ``[T, blocks, N]`` slice of the clip search."""


@dataclass(frozen=True)
class AwqLayer:
    """One layer reading ``X``: its weight's name and values (graph layout), the weight axis
    that runs along ``X``'s channels, and how the weight is quantized."""

    name: str
    weight: np.ndarray
    axis: int
    spec: TensorSpec
    granularity: Granularity

    def canonical(self, array: np.ndarray) -> np.ndarray:
        """``array`` (graph layout) as ``[K, N]``."""
        return array if self.axis == 0 else array.T

    def scaled(self, factors: np.ndarray) -> np.ndarray:
        """``s W`` as ``graphs.smooth.fold_factors`` writes it: float64 product, own dtype."""
        shape = [-1, 1] if self.axis == 0 else [1, -1]
        product = self.weight.astype(np.float64) * factors.reshape(shape)
        return product.astype(self.weight.dtype)

    def quantized(self, canonical: np.ndarray, nonfinite: str) -> np.ndarray:
        """``Q(weight)`` of a weight given as ``[K, N]``, as ``[K, N]`` float64: the export's
        max scales and rounding (``calibrate_weight``), or for a finite float32 weight in
        blocks of a column the same arithmetic on its block view (``blocks_quantized``)."""
        block = self.clip_block()
        if block is not None and canonical.dtype == np.float32 and np.isfinite(canonical).all():
            return blocks_quantized(canonical, get_format(self.spec.format), block)
        values = torch.from_numpy(np.array(self.canonical(canonical)))
        spec = dataclasses.replace(self.spec, method=MAX.name, options={})
        scales = calibrate_weight(self.name, values, spec, self.granularity, nonfinite)
        return self.canonical(scales.fake_quant_weight(values).double().numpy())

    def clip_block(self) -> int | None:
        """The input channels of one quantization block of a weight column: the block size
        (blocks along K), ``K`` (one scale per output channel), None for other layouts."""
        granularity = self.granularity
        if isinstance(granularity, PerBlock) and granularity.axis % 2 == self.axis:
            return granularity.size
        if isinstance(granularity, PerAxis) and granularity.axis % 2 == 1 - self.axis:
            return self.weight.shape[self.axis]
        return None


@dataclass(frozen=True)
class ScaleChoice:
    """The chosen ``alpha``, its factors ``s`` (``[K]``, float64), the joint output error
    of every alpha of the grid (``alphas``, ``errors``) and the layers' ``sum ||X W||²``."""

    alpha: float
    factors: np.ndarray
    alphas: np.ndarray
    errors: np.ndarray
    reference: float

    @property
    def rtn_error(self) -> float:
        """The error at alpha 0 (``s = 1``): round-to-nearest's."""
        return float(self.errors[0])

    @property
    def error(self) -> float:
        return float(self.errors[int(np.argmin(self.errors))])


def blocks_quantized(weight: np.ndarray, fmt: IntFormat, block: int) -> np.ndarray:
    """``weight`` (``[K, N]`` float32, finite) quantized with max scales per block of ``block``
    rows of a column, as float64: the format's ``scale_zero_point`` and ``fake_quant`` on
    the weight's ``[blocks, block, N]`` view (a partial block padded with zeros, as
    ``PerBlock`` pads it), float32 scales floored at ``SCALE_FLOOR`` as ``tensor_scales``
    floors a float32 weight's."""
    k, n = weight.shape
    values = torch.from_numpy(np.array(weight))
    padded = torch.nn.functional.pad(values, (0, 0, 0, -k % block)).reshape(-1, block, n)
    amin, amax = padded.amin(dim=1, keepdim=True), padded.amax(dim=1, keepdim=True)
    scale, zero_point = fmt.scale_zero_point(amin, amax, SCALE_FLOOR)
    found = fmt.fake_quant(padded, scale, zero_point)
    return found.reshape(-1, n)[:k].double().numpy()


def alpha_grid(points: int) -> np.ndarray:
    """``points`` alphas evenly spaced over [0, 1], 0 first."""
    return np.linspace(0.0, 1.0, int(points))


def awq_factors(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """``s = mean|x|^alpha`` per channel, divided by ``sqrt(max(s) min(s))`` (centred on 1 in
    the log; a common factor changes neither the layer nor its max-scaled quantization)."""
    powered = np.maximum(np.asarray(mean_abs, dtype=np.float64), CHANNEL_FLOOR) ** alpha
    return powered / math.sqrt(powered.max() * powered.min())


def search_scales(
    mean_abs: np.ndarray, rows: np.ndarray, layers: list[AwqLayer], points: int, nonfinite: str
) -> ScaleChoice:
    """The alpha of the grid whose factors give the least joint output error of ``layers``
    on ``rows`` (``[T, K]``); the first (smallest alpha) where several tie."""
    x = np.asarray(rows, dtype=np.float64)
    exact = [x @ layer.canonical(layer.weight.astype(np.float64)) for layer in layers]
    alphas = alpha_grid(points)
    errors = np.empty(len(alphas))
    for i, alpha in enumerate(alphas):
        factors = awq_factors(mean_abs, alpha)
        scaled_x = x / factors
        errors[i] = sum(
            _squared(
                scaled_x @ layer.quantized(layer.canonical(layer.scaled(factors)), nonfinite), e
            )
            for layer, e in zip(layers, exact, strict=True)
        )
    best = int(np.argmin(errors))
    reference = sum(float(np.einsum("ij,ij->", e, e)) for e in exact)
    factors = awq_factors(mean_abs, alphas[best])
    return ScaleChoice(float(alphas[best]), factors, alphas, errors, reference)


def _squared(found: np.ndarray, exact: np.ndarray) -> float:
    diff = found - exact
    return float(np.einsum("ij,ij->", diff, diff))


def clip_blocks(weight: np.ndarray, ratios: np.ndarray, block: int) -> np.ndarray:
    """``weight`` (``[K, N]``) with each block of ``block`` rows of a column clamped to
    ``±ratio * max|block|`` (``ratios``: ``[ceil(K / block), N]``)."""
    k = weight.shape[0]
    amax = _block_amax(weight, block)
    bound = np.repeat(ratios * amax, block, axis=0)[:k]
    return np.clip(weight, -bound, bound).astype(weight.dtype)


def _block_amax(weight: np.ndarray, block: int) -> np.ndarray:
    k, n = weight.shape
    padded = np.zeros((-(-k // block) * block, n), dtype=np.float64)
    padded[:k] = np.abs(weight)
    return padded.reshape(-1, block, n).max(axis=1)


def search_clip(
    rows: np.ndarray, layer: AwqLayer, block: int, nonfinite: str, ratios=CLIP_RATIOS
) -> tuple[np.ndarray, float, float]:
    """Per block of ``layer``'s weight (already scaled; ``rows`` its input, already divided by
    the factors), the ratio of ``ratios`` whose clamp gives the least
    ``sum_t (x_t,block · (w - Q(clip(w)))_block)²``; ties keep the first (1: no clip).
    Returns the ratios ``[blocks, N]`` and the layer's output error without and with them."""
    x = np.asarray(rows, dtype=np.float64)
    weight = layer.canonical(layer.weight)
    k, n = weight.shape
    blocks = -(-k // block)
    padded_x = np.zeros((x.shape[0], blocks * block))
    padded_x[:, :k] = x
    xb = padded_x.reshape(x.shape[0], blocks, block)
    best_error = np.full((blocks, n), np.inf)
    best = np.ones((blocks, n))
    for ratio in ratios:
        clipped = clip_blocks(weight, np.full((blocks, n), ratio), block)
        found = layer.quantized(clipped, nonfinite)
        error = _block_errors(xb, weight.astype(np.float64) - found, block)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best = np.where(better, ratio, best)
    exact = x @ weight.astype(np.float64)
    plain = _squared(x @ layer.quantized(weight, nonfinite), exact)
    chosen = layer.quantized(clip_blocks(weight, best, block), nonfinite)
    return best, plain, _squared(x @ chosen, exact)


def _block_errors(xb: np.ndarray, diff: np.ndarray, block: int) -> np.ndarray:
    """``[blocks, N]``: per block and column, ``sum_t (x_t,block · diff_block,column)²``."""
    t, blocks, _ = xb.shape
    n = diff.shape[1]
    padded = np.zeros((blocks * block, n))
    padded[: diff.shape[0]] = diff
    db = padded.reshape(blocks, block, n)
    errors = np.empty((blocks, n))
    step = max(1, CHUNK_ELEMENTS // max(1, t * blocks))
    for start in range(0, n, step):
        partial = np.einsum("tbk,bkn->tbn", xb, db[:, :, start : start + step])
        errors[:, start : start + step] = np.einsum("tbn,tbn->bn", partial, partial)
    return errors
