"""The granularities added for serving checkpoints (group index, 2-D blocks, token) against plain
numpy, their dict round trips and their errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from qcal_export.errors import RecipeError
from qcal_export.spec.granularity import (
    PerAxis,
    PerBlock,
    PerBlock2D,
    PerGroupIndex,
    PerTensor,
    PerTensorGroup,
    PerToken,
    granularity_from_dict,
)


def actorder_g_idx(columns: int, size: int, seed: int = 0) -> np.ndarray:
    """GPTQ activation ordering: the i-th column of a random permutation is in group i // size."""
    perm = np.random.default_rng(seed).permutation(columns)
    g_idx = np.empty(columns, dtype=np.int64)
    g_idx[perm] = np.arange(columns) // size
    return g_idx


def numpy_index_groups(x: np.ndarray, axis: int, size: int, g_idx: np.ndarray) -> np.ndarray:
    """Rows of each group's columns (ascending), zero-padded to ``size``, axis moved last."""
    rows = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    out = []
    for row in rows:
        for group in range(g_idx.max() + 1):
            values = row[g_idx == group]
            out.append(np.pad(values, (0, size - len(values))))
    return np.array(out)


@pytest.mark.parametrize(("shape", "axis"), [((5, 40), 1), ((40, 3), 0), ((2, 40, 3), 1)])
def test_group_index_against_numpy(shape, axis):
    g_idx = actorder_g_idx(40, 16)
    gran = PerGroupIndex(axis, 16, tuple(g_idx))
    x = torch.randn(shape)
    groups = gran.groups(x)
    np.testing.assert_array_equal(groups.numpy(), numpy_index_groups(x.numpy(), axis, 16, g_idx))
    stat_shape = gran.stat_shape(shape)
    assert stat_shape == tuple(3 if i == axis % len(shape) else n for i, n in enumerate(shape))
    stat = gran.unflatten(groups.abs().amax(-1), stat_shape)
    expected = np.abs(x.numpy())
    for group in range(3):  # the amax of each group's columns, by plain indexing
        columns = np.take(expected, np.flatnonzero(g_idx == group), axis=axis)
        np.testing.assert_array_equal(
            np.take(stat.numpy(), group, axis=axis), columns.max(axis=axis)
        )
    assert torch.equal(gran.flatten(stat), groups.abs().amax(-1))
    expanded = gran.expand(stat, shape)
    assert tuple(expanded.shape) == shape
    np.testing.assert_array_equal(expanded.numpy(), np.take(stat.numpy(), g_idx, axis=axis))


def test_group_index_in_order_equals_per_block():
    """Columns already in group order: the same groups and statistics as PerBlock."""
    g_idx = tuple(np.arange(40) // 16)
    x = torch.randn(6, 40)
    ordered, blocks = PerGroupIndex(-1, 16, g_idx), PerBlock(-1, 16)
    assert torch.equal(ordered.groups(x), blocks.groups(x))
    assert ordered.stat_shape((6, 40)) == blocks.stat_shape((6, 40)) == (6, 3)
    stat = torch.randn(6, 3)
    assert torch.equal(ordered.expand(stat, (6, 40)), blocks.expand(stat, (6, 40)))


@pytest.mark.parametrize(
    ("size", "g_idx", "match"),
    [
        (2, (0, 0, 1, 1, 1), "3 columns in group 1"),
        (2, (0, 2, 2, 0), "0 columns in group 1"),
        (2, (0, 1, 0, 1, 1), "3 columns in group 1"),
        (4, (1, 1, 1, 1, 0), "1 columns in group 0"),
        (2, (), "non-empty"),
        (2, (0, -1), "non-empty"),
        (0, (0, 0), "size >= 1"),
    ],
)
def test_group_index_rejects_bad_g_idx(size, g_idx, match):
    with pytest.raises(ValueError, match=match):
        PerGroupIndex(1, size, g_idx)


def test_group_index_rejects_another_column_count():
    gran = PerGroupIndex(1, 2, (0, 1, 0, 1))
    for call in (lambda: gran.groups(torch.zeros(3, 5)), lambda: gran.stat_shape((3, 5))):
        with pytest.raises(ValueError, match="4 columns in g_idx, the tensor 5"):
            call()


def numpy_tiles(x: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Every [rows, cols] block of the last two axes, zero-padded and flattened, and the
    per-element block number, by slicing."""
    lead = x.reshape(-1, *x.shape[-2:])
    blocks, owner = [], np.empty(lead.shape, dtype=np.int64)
    for i, matrix in enumerate(lead):
        for r in range(0, matrix.shape[0], rows):
            for c in range(0, matrix.shape[1], cols):
                tile = matrix[r : r + rows, c : c + cols]
                padded = np.zeros((rows, cols), x.dtype)
                padded[: tile.shape[0], : tile.shape[1]] = tile
                owner[i, r : r + rows, c : c + cols] = len(blocks)
                blocks.append(padded.reshape(-1))
    return np.array(blocks), owner.reshape(x.shape)


@pytest.mark.parametrize(
    ("shape", "rows", "cols"), [((20, 40), 8, 16), ((2, 20, 40), 8, 16), ((16, 32), 8, 16)]
)
def test_2d_blocks_against_numpy(shape, rows, cols):
    gran = PerBlock2D(rows, cols)
    x = torch.randn(shape)
    blocks, owner = numpy_tiles(x.numpy(), rows, cols)
    np.testing.assert_array_equal(gran.groups(x).numpy(), blocks)
    stat_shape = gran.stat_shape(shape)
    assert stat_shape == (*shape[:-2], -(-shape[-2] // rows), -(-shape[-1] // cols))
    flat = torch.arange(len(blocks), dtype=torch.float32)
    stat = gran.unflatten(flat, stat_shape)
    assert tuple(stat.shape) == stat_shape
    assert torch.equal(gran.flatten(stat), flat)
    np.testing.assert_array_equal(gran.expand(stat, shape).numpy(), owner)


def test_2d_blocks_need_two_axes():
    with pytest.raises(ValueError, match="2 or more axes"):
        PerBlock2D(2, 2).stat_shape((8,))
    with pytest.raises(ValueError, match="rows, cols >= 1"):
        PerBlock2D(0, 4)


@pytest.mark.parametrize("shape", [(7,), (3, 7), (2, 3, 7)])
def test_token_against_numpy(shape):
    gran = PerToken()
    x = torch.randn(shape)
    np.testing.assert_array_equal(gran.groups(x).numpy(), x.numpy().reshape(-1, shape[-1]))
    assert gran.stat_shape(shape) == shape[:-1]
    stat = gran.unflatten(gran.groups(x).amax(-1), shape[:-1])
    np.testing.assert_array_equal(stat.numpy(), x.numpy().max(-1))
    assert torch.equal(gran.flatten(stat), gran.groups(x).amax(-1))
    assert tuple(gran.expand(stat, shape).shape) == (*shape[:-1], 1)
    assert bool((gran.expand(stat, shape) >= x).all())
    with pytest.raises(ValueError, match="scalar"):
        gran.stat_shape(())


ALL = [
    PerTensor(),
    PerAxis(0),
    PerBlock(-1, 16),
    PerTensorGroup(-1, 16),
    PerGroupIndex(1, 2, (1, 0, 0, 2, 1)),
    PerBlock2D(128, 64),
    PerToken(),
]


@pytest.mark.parametrize("gran", ALL, ids=lambda g: g.describe())
def test_dict_round_trip(gran):
    data = gran.to_dict()
    assert granularity_from_dict(data) == gran
    assert hash(granularity_from_dict(data)) == hash(gran)


def test_group_index_takes_any_integer_sequence():
    as_tuple = PerGroupIndex(0, 2, (1, 0, 0, 1))
    assert PerGroupIndex(0, 2, [1, 0, 0, 1]) == as_tuple
    assert PerGroupIndex(0, 2, torch.tensor([1, 0, 0, 1])) == as_tuple
    assert PerGroupIndex(0, 2, np.array([1, 0, 0, 1])).to_dict()["g_idx"] == [1, 0, 0, 1]


@pytest.mark.parametrize("gran", ALL[4:], ids=lambda g: g.describe())
def test_serving_granularities_have_no_onnx_form(gran):
    with pytest.raises(RecipeError, match=rf"{re.escape(gran.describe())}.*not ONNX QDQ"):
        gran.onnx_attributes()


def test_onnx_granularities_keep_their_attributes():
    assert [g.onnx_attributes() for g in ALL[:4]] == [
        {},
        {"axis": 0},
        {"axis": -1, "block_size": 16},
        {},
    ]


def test_unknown_granularity_raises():
    with pytest.raises(ValueError, match="per-token"):
        granularity_from_dict({"type": "per-row"})
