"""Values a scales file must not hold: nan, zero or negative scales, scales not float32, shapes
that disagree, zero points the format cannot take, NVFP4 global and block scales out of range,
an unknown format. Each is a ScalesError naming the file and the tensor; the file is a good one
tampered with safetensors' own save_file.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file
from scales_cases import SHA, calibrated, stored

from qcal_export.artifacts.scales import load_scales, save_scales
from qcal_export.calibrate.tensor import calibrate_weight
from qcal_export.errors import ScalesError
from qcal_export.spec.granularity import PerBlock
from qcal_export.spec.recipe import TensorSpec
from qcal_export.spec.scales import TensorScales


def nvfp4_weight() -> TensorScales:
    """NVFP4 scales of a [2, 32] weight in blocks of 16 along axis 1 (block scales [2, 2])."""
    values = torch.randn(2, 32, generator=torch.Generator().manual_seed(9))
    spec = TensorSpec("nvfp4", block_size=16)
    return calibrate_weight("n", values, spec, PerBlock(1, 16), "skip")


@pytest.fixture
def good_file(tmp_path):
    """int8 per-axis weight 'w' (scale [6]), uint8 activation 'a', fp8 activation 'f', nvfp4
    weight 'n': a file load_scales reads."""
    scales = {
        "w": calibrated("w", "int8", axis=0, kind="weight"),
        "a": calibrated("a", "uint8", seed=3),
        "f": calibrated("f", "fp8", seed=5),
        "n": nvfp4_weight(),
    }
    return save_scales(tmp_path / "s.safetensors", scales, SHA)


def tamper(path, key: str, value: torch.Tensor | None, header_change=None) -> None:
    """Rewrite ``path`` with safetensors' own save_file: entry ``key`` replaced (None: removed),
    the header kept (or changed by ``header_change``)."""
    tensors, header = stored(path)
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value
    if header_change is not None:
        header_change(header)
    save_file(tensors, str(path), metadata={"qcal_export": json.dumps(header)})


NAN = float("nan")


BAD_VALUES = {
    "nan-scale": (
        "w.scale",
        torch.tensor([NAN, 1, 1, 1, 1, 1.0]),
        r"'w': scale must be positive finite, found nan \(1 of 6\)",
    ),
    "inf-scale": (
        "a.scale",
        torch.tensor(float("inf")),
        r"'a': scale must be positive finite, found inf \(1 of 1\)",
    ),
    "zero-scale": ("f.scale", torch.tensor(0.0), r"'f': scale must be positive finite, found 0\.0"),
    "negative-scale": (
        "w.scale",
        -torch.ones(6),
        r"'w': scale must be positive finite, found -1\.0 \(6 of 6\)",
    ),
    "int-scale": (
        "a.scale",
        torch.tensor(1, dtype=torch.int32),
        r"'a': scale is int32, not float32$",
    ),
    "fp16-scale": (
        "w.scale",
        torch.ones(6, dtype=torch.float16),
        r"'w': scale is float16, not float32$",
    ),
    "bool-scale": ("f.scale", torch.tensor(True), r"'f': scale is bool, not float32$"),
    "nan-amax": ("a.amax", torch.tensor(NAN), r"'a': amax must be finite, found nan"),
    "amax-shape": ("w.amax", torch.ones(5), r"'w': amax has shape \[5\], its scale \[6\]$"),
    "min-shape": ("a.min", torch.zeros(2), r"'a': min has shape \[2\], its scale \[\]$"),
    "zero-point-shape": (
        "w.zero_point",
        torch.zeros(1, dtype=torch.int8),
        r"'w': zero_point has shape \[1\], its scale \[6\]$",
    ),
    "uint8-zero-point-300": (
        "a.zero_point",
        torch.tensor(300, dtype=torch.int16),
        r"'a': zero_point 300 does not fit uint8: it takes integers in \[0, 255\]$",
    ),
    "uint8-zero-point-negative": (
        "a.zero_point",
        torch.tensor(-1, dtype=torch.int32),
        r"'a': zero_point -1 does not fit uint8",
    ),
    "zero-point-not-integer": (
        "a.zero_point",
        torch.tensor(3.5),
        r"'a': zero_point 3\.5 does not fit uint8: it takes integers",
    ),
    "int8-zero-point-not-0": (
        "w.zero_point",
        torch.tensor([0, 0, 3, 0, 0, 0], dtype=torch.int8),
        r"'w': zero_point 3 does not fit int8: it takes 0 \(symmetric format\)$",
    ),
    "fp8-zero-point-not-0": (
        "f.zero_point",
        torch.tensor(1.0).to(torch.float8_e4m3fn),
        r"'f': zero_point 1 does not fit fp8: it takes 0",
    ),
    "bool-zero-point": (
        "a.zero_point",
        torch.tensor(True),
        r"'a': zero_point is bool, not a number type$",
    ),
    "nan-global-scale": (
        "n.global_scale",
        torch.tensor(NAN),
        r"'n': global_scale must be positive finite, found nan",
    ),
    "zero-global-scale": (
        "n.global_scale",
        torch.tensor(0.0),
        r"'n': global_scale must be positive finite, found 0\.0",
    ),
    "global-scale-shape": (
        "n.global_scale",
        torch.ones(2),
        r"'n': global_scale has shape \[2\], not \[\]",
    ),
    "no-global-scale": ("n.global_scale", None, r"'n' lacks entry 'n\.global_scale'$"),
    "block-scale-past-fp8": (
        "n.scale",
        torch.full((2, 2), 500.0),
        r"'n': nvfp4 block scales must lie in \[0\.00195312, 448\] \(FP8 E4M3\), found 500 to 500$",
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_values_no_export_can_use_are_a_scales_error_naming_file_and_tensor(good_file, case):
    load_scales(good_file)  # the untouched file loads
    key, value, message = BAD_VALUES[case]
    tamper(good_file, key, value)
    with pytest.raises(ScalesError, match=rf"^{re.escape(str(good_file))}: tensor {message}"):
        load_scales(good_file)


def test_an_unknown_format_in_the_header_is_a_scales_error(good_file):
    tamper(
        good_file, "a.scale", torch.tensor(0.5), lambda h: h["tensors"]["a"].update(format="int3")
    )
    with pytest.raises(ScalesError, match=r"tensor 'a' has format 'int3', not one of \["):
        load_scales(good_file)
