"""AWQ's weight clipping on the ONNX graph: each block of a MatMul/Gemm weight clamped to
``±ratio * max|block|``, with the ratios its search chose (``calibrate/awq_search``).

A ratio is of the block's own max, so it holds however the weight's output channels were
scaled since the search (a later fold of smoothing factors into this layer as a producer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from qcal_export.calibrate.awq_search import clip_blocks
from qcal_export.onnx_io.weights import store_embedded, to_array


@dataclass(frozen=True)
class Clip:
    """Ratios ``[blocks, N]`` per block of ``block`` input channels and output channel; the
    weight axis along the input channels (0: ``[K, N]``, 1: ``[N, K]``)."""

    ratios: np.ndarray
    block: int
    axis: int


def clip_weights(model: onnx.ModelProto, clips: dict[str, Clip]) -> None:
    """Clamp, in ``model`` (a copy the caller owns), the weight of each node named in ``clips``;
    each such weight must be read by that node alone (``fold_factors`` gives it its own)."""
    weights = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        clip = clips.get(node.name)
        if clip is None:
            continue
        init = weights[node.input[1]]
        values = np.array(to_array(init))
        canonical = values if clip.axis == 0 else values.T
        clipped = clip_blocks(canonical, clip.ratios, clip.block)
        clipped = clipped if clip.axis == 0 else clipped.T
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(clipped), init.name))
    store_embedded(model)
