"""What the CLI fuzz test (test_fuzz_cli.py) generates: recipes valid but for at most one fault,
``--option`` values and numeric arguments mostly in range, and damaged bytes and arrays for the
data, scales and state files.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from qcal_export.spec.methods import METHOD_OPTIONS

# ---- recipes ---------------------------------------------------------------------------------

PLAUSIBLE = {
    "start": [0.5, 0.1, 1],
    "stop": [2, 1.5, 8.0],
    "step": [0.05, 0.25, 0.5],
    "hessian": [True, 1, 0],
    "maxshrink": [0.5, 1],
    "grid": [50, 200],
    "norm": [1, 3.5],
    "patience": [2, 10],
    "averaging_constant": [0.1, 1],
    "percentile": [99.9, 100, 50],
    "bins": [64, 512, 4999],
    "quantized_bins": [32, 255],
    "max_clipped": [1e-3, 0.5, 1],
}
"""Values in range for each option (the ranges' ends included), so most examples run."""
BAD_NUMBERS = [math.nan, math.inf, -math.inf, 0, -1, 1e300, 1e-300, True, "x", None, [1]]


@st.composite
def method_and_options(draw, methods: list[str]) -> dict:
    method = draw(st.sampled_from(methods))
    taken = sorted(METHOD_OPTIONS.get(method) or ["bins"])
    keys = draw(st.lists(st.sampled_from(taken), max_size=2))
    return {"method": method, "options": {k: draw(st.sampled_from(PLAUSIBLE[k])) for k in keys}}


ACTIVATION_METHODS = ["max", "mse", "percentile", "entropy", "shrink-mse", "auto"]
activation_spec = st.builds(
    lambda fmt, rest: {"format": fmt, **rest},
    st.sampled_from(["int8", "uint8", "fp8", "nvfp4"]),
    method_and_options(ACTIVATION_METHODS),
)
weight_spec = st.one_of(
    st.builds(
        lambda fmt, channel, block, rest: {
            "format": fmt,
            "per_channel": channel,
            **({"block_size": block} if block else {}),
            **rest,
        },
        st.sampled_from(["int8", "uint8", "int4", "uint4", "fp8"]),
        st.booleans(),
        st.sampled_from([None, None, 2, 16, 32, 4096]),
        method_and_options(["max", "mse", "shrink-mse", "percentile", "entropy"]),
    ),
    st.builds(
        lambda rest: {"format": "nvfp4", **rest}, method_and_options(["max", "mse", "nvfp4-mse"])
    ),
)
override = st.fixed_dictionaries(
    {"nodes": st.sampled_from(["*", "/fc/*", "/conv/Conv", "/fc/Gemm", "nothing*"])},
    optional={
        "op_types": st.lists(st.sampled_from(["Gemm", "Conv", "MatMul"]), max_size=2),
        "activation": st.one_of(st.none(), activation_spec),
        "weight": st.one_of(st.none(), weight_spec),
    },
)
valid_recipe = st.fixed_dictionaries(
    {},
    optional={
        "activation": st.one_of(st.none(), activation_spec),
        "weight": st.one_of(st.none(), weight_spec),
        "op_types": st.lists(st.sampled_from(["MatMul", "Gemm", "Conv", "Relu"]), max_size=3),
        "exclude_nodes": st.sampled_from([["/fc/Gemm"], ["/conv/*"], ["nothing*"], []]),
        "exclude_op_types": st.sampled_from([["Conv"], ["Gemm"], []]),
        "overrides": st.lists(override, max_size=2),
        "weights_mode": st.sampled_from(["quantized", "qdq"]),
        "nonfinite": st.sampled_from(["skip", "error"]),
        "nvfp4_form": st.sampled_from(["portable", "tensorrt"]),
    },
)
FAULTS = {
    ("activation", "format"): ["int3", ["int8"], 5, "int4"],
    ("activation", "method"): ["kl", ["max"], "nvfp4-mse"],
    ("activation", "options"): [5, [1], "x", {"gird": 10}],
    ("activation", "axis"): [1],
    ("weight", "per_channel"): ["no", 1, None],
    ("weight", "block_size"): [0, 1, -4, "x", 4097, 64.0, True],
    ("op_types",): [5, "Gemm", [1], None],
    ("exclude_nodes",): [[1], "/fc/*", ["/fc/Gem"]],
    ("overrides",): [5, {"nodes": "*"}, [{"nodes": 5}], [{"node": "x"}], [5]],
    ("weights_mode",): [5, "fake"],
    ("nonfinite",): ["ignore", [1]],
    ("nvfp4_form",): ["trt", {}],
    ("formats",): ["int8"],
}


@st.composite
def recipes(draw) -> object:
    """A valid recipe, with at most one fault: a bad value of one key, a bad option value, or
    not a mapping at all."""
    data = draw(valid_recipe)
    fault = draw(st.sampled_from([None, None, "value", "option", "top"]))
    if fault == "top":
        return draw(st.sampled_from([[1, 2], 0, "int8", [{"activation": None}]]))
    if fault == "value":
        path = draw(st.sampled_from(sorted(FAULTS)))
        parent = data
        if len(path) == 2:
            parent = data.setdefault(path[0], {}) or {}
            data[path[0]] = parent
        parent[path[-1]] = draw(st.sampled_from(FAULTS[path]))
    if fault == "option":
        spec = data.get("activation") or data.get("weight") or {"method": "percentile"}
        data.setdefault("activation" if "activation" in data else "weight", spec)
        key = draw(st.sampled_from(sorted(METHOD_OPTIONS.get(spec.get("method")) or ["bins"])))
        spec.setdefault("options", {})[key] = draw(st.sampled_from(BAD_NUMBERS))
    return data


garble = st.one_of(
    st.none(),
    st.none(),
    st.none(),
    st.tuples(st.integers(0, 400), st.sampled_from([b":", b"[", b"{", b"-", b"'", b"\t", b"\xff"])),
)


# ---- method options and numeric arguments ----------------------------------------------------

OPTION_KEYS = [*sorted(set().union(*METHOD_OPTIONS.values())), "gird"]
"""Every key a method option takes, and one misspelt."""
option_value = st.one_of(
    st.sampled_from(sorted({str(float(v)) for values in PLAUSIBLE.values() for v in values})),
    st.sampled_from(sorted({str(int(v)) for values in PLAUSIBLE.values() for v in values})),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(-5, 10**11).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "1e-320", "0", "-1", "1e10", "x", ""]),
)
ARGUMENTS = {
    "--batch-size": st.integers(-1, 8),
    "--batches": st.integers(0, 6),
    "--validate-batches": st.integers(-1, 5),
    "--block-size": st.one_of(st.integers(1, 40), st.sampled_from([128, 4096, 5000])),
    "--holdout-every": st.integers(1, 4),
    "--view-batches": st.integers(0, 3),
    "--device-id": st.integers(-1, 1),
    "--nproc": st.sampled_from([1, 1, 0]),
    "--smooth": st.one_of(st.floats(0.01, 0.99), st.sampled_from([math.nan, -1, 1, 2])),
    "--target-cosine": st.one_of(st.floats(0.5, 1), st.sampled_from([math.nan, 0, 1.5])),
    "--target-rel-l2": st.one_of(st.floats(0.001, 2), st.sampled_from([math.inf, 0, -0.1])),
    "--state-every": st.integers(0, 3),
}
"""Numeric arguments: mostly in range, now and then just out of it."""


# ---- damaged files ---------------------------------------------------------------------------


def damage_bytes(data: bytes, how: str, at: float, bit: int) -> bytes:
    """``data`` truncated at fraction ``at``, emptied, with bit ``bit`` flipped there, or intact."""
    position = min(int(at * len(data)), len(data) - 1)
    if how == "truncate":
        return data[:position]
    if how == "empty":
        return b""
    if how == "flip":
        return data[:position] + bytes([data[position] ^ (1 << bit)]) + data[position + 1 :]
    return data


ARRAYS = {
    "float64": lambda x: x.astype(np.float64),
    "int32": lambda x: x.astype(np.int32),
    "rank-3": lambda x: x[:, :, :, 0],
    "9x9": lambda x: np.zeros((6, 3, 9, 9), np.float32),
    "empty-batch": lambda x: x[:0],
    "scalar": lambda x: np.float32(1),
    "nan": lambda x: np.where(x > 1, np.nan, x).astype(np.float32),
    "inf": lambda x: np.full_like(x, np.inf),
    "huge": lambda x: np.clip(x, -1, 1) * np.float32(3e38),
    "zeros": lambda x: np.zeros_like(x),
}
