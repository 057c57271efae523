"""Every candidate's summed squared QDQ error of one large group from a fine histogram of its
values: per bucket sums where the candidate maps the whole bucket to one value, the values
themselves only in the few buckets where its output changes.

A bucket is ``2 ** SHIFT`` consecutive float32 values (one sign, one binade). Q -> DQ is
monotone, so a candidate maps a bucket to one value ``c`` exactly when it maps both ends there;
then, with ``r`` the bucket's end nearest 0 and ``u = x - r`` (exact in float32),
``sum (c - x) ** 2 = sum u ** 2 - 2 (c - r) sum u + (c - r) ** 2 count``, all in float64 with
``u`` small: no cancellation beyond float64 rounding. Values that the smallest scale already
quantizes to 0 share one bucket (``r = 0``). Shapes: ``x`` ``[n]`` finite float32, ``scale`` and
``zero_point`` ``[K]``; losses ``[K]`` float64.
"""

from __future__ import annotations

import torch

from qcal_export.calibrators.cpu_sweep import TILE_ELEMENTS, tiles
from qcal_export.spec.formats import Format

SHIFT = 10
"""Low bits a bucket spans: 1024 consecutive float32 values, a relative width of 2 ** -13."""
MIN_VALUES = 1 << 23
"""Groups of fewer values are scored value by value: below a few million values the tile sweep,
with the values every candidate zeroes set apart, is the faster of the two (both are exact)."""


def bucket_losses(
    fmt: Format, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> torch.Tensor:
    """``sum (QDQ_k(x) - x) ** 2`` for each candidate ``k`` (see the module docstring)."""
    bits = x.abs().view(torch.int32) >> SHIFT
    limit = 0.5 if fmt.integer else 2.0**-10
    floor = torch.tensor(limit, dtype=torch.float32) * scale.min()
    first = max(int(floor.view(torch.int32)) >> SHIFT, 1) - 1
    span = int(bits.max()) - first + 1
    index = (bits - first).clamp_(min=0).add_(x < 0, alpha=span)
    ends = torch.arange(span, dtype=torch.int32).add_(first)
    low = torch.cat([ends, ends]) << SHIFT
    high = low | ((1 << SHIFT) - 1)
    low[0] = low[span] = 0
    sign = torch.ones(2 * span)
    sign[span:] = -1.0
    low, high = low.view(torch.float32) * sign, high.view(torch.float32) * sign
    reference = (x.view(torch.int32) & -(1 << SHIFT)).view(torch.float32)
    u = torch.where(bits > first, x - reference, x).double()
    count = torch.bincount(index, minlength=2 * span).double()
    sum1 = torch.bincount(index, weights=u, minlength=2 * span)
    sum2 = torch.bincount(index, weights=u.square_(), minlength=2 * span)
    used = count.nonzero().squeeze(1)
    scale, zero_point = scale[:, None], zero_point[:, None]
    c_low = fmt.fake_quant(low[used][None], scale, zero_point)
    pure = c_low == fmt.fake_quant(high[used][None], scale, zero_point)
    delta = c_low.double().sub_(low[used].double())
    losses = sum2[used] - 2 * delta * sum1[used] + delta.square() * count[used]
    losses = torch.where(pure, losses, 0.0).sum(-1)
    impure = torch.zeros(scale.shape[0], 2 * span, dtype=torch.bool)
    impure[:, used] = ~pure
    inside = impure.any(dim=0)[index].nonzero().squeeze(1)
    return losses + _value_losses(fmt, x[inside], index[inside], impure, scale, zero_point)


def _value_losses(
    fmt: Format,
    x: torch.Tensor,
    index: torch.Tensor,
    impure: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
) -> torch.Tensor:
    """Summed squared error of values ``x`` ``[m]`` in buckets ``index``, each candidate over
    the values of the buckets where its output changes (``impure`` ``[K, buckets]``), ``[K]``
    float64."""
    losses = torch.zeros(scale.shape[0], dtype=torch.float64)
    for k in range(scale.shape[0]):
        values = x[impure[k][index].nonzero().squeeze(1)]
        for _, cols in tiles(1, len(values), TILE_ELEMENTS, 1):
            part = values[cols]
            xq = fmt.fake_quant(part, scale[k], zero_point[k])
            losses[k] += xq.double().sub_(part).square_().sum()
    return losses
