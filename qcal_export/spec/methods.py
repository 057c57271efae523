"""Calibration methods, each declared once: its name, its options with the values they admit,
the tensors and formats it calibrates, and the traits callers test (a search, a Hessian).

Method lists, CLI choices and option checks derive from ``METHODS``; ``calibrators.CALIBRATORS``
maps each method that is not a search to its calibrator class (a test holds the two equal).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from qcal_export.errors import RecipeError
from qcal_export.spec.choices import TensorKind
from qcal_export.spec.method_options import (
    ENTROPY_MAX_BINS,
    FRACTION,
    MAX_BINS,
    MAX_NORM,
    MULTIPLIER,
    Bound,
    check_entropy,
    check_mse,
    check_shrink_mse,
)

HESSIAN = "hessian"
"""The option that weights a method's error by its layer's input ``Xᵀ X``: it chooses the data
the calibrator gets, not a constructor argument."""
MAX_LAZY_BLOCK = 1 << 16
"""Most columns GPTQ updates inside one block (default 128): the block's errors are ``[N, b]``."""
OptionRules = Callable[[Mapping[str, float]], None]


@dataclass(frozen=True)
class MethodSpec:
    """One calibration method.

    ``bounds``: each option it takes and the values that option admits (the calibrator's
    constructor says what it means); ``defaults``: the constructor's defaults that ``rules``
    (RecipeError for options that do not go together) need; ``kinds``: the tensors it
    calibrates, and ``weight_only_reason`` why activations cannot take it; ``formats``: the only
    formats it calibrates (None: every format); ``among``: the methods a search chooses among,
    per tensor, by its consumers' output error (the first is its stand-in until the choice);
    ``full_hessian``: it always takes its layer input's full ``Xᵀ X`` ``[K, K]`` (GPTQ);
    ``block_activations``: whether it calibrates the global amax of activations whose block
    scales the graph computes (NVFP4), which a search then chooses among;
    ``step_options``: options a step before calibration reads (AWQ's search), not the calibrator.
    """

    name: str
    bounds: Mapping[str, Bound] = field(default_factory=dict)
    defaults: Mapping[str, float] = field(default_factory=dict)
    rules: OptionRules | None = None
    kinds: frozenset[TensorKind] = frozenset(TensorKind)
    weight_only_reason: str = ""
    formats: tuple[str, ...] | None = None
    among: tuple[MethodSpec, ...] = ()
    full_hessian: bool = False
    block_activations: bool = True
    step_options: frozenset[str] = frozenset()

    @property
    def options(self) -> frozenset[str]:
        """The option keys it takes; a search takes those of every method it chooses among."""
        if self.among:
            return frozenset().union(*(method.options for method in self.among))
        return frozenset(self.bounds)

    @property
    def searches(self) -> bool:
        """A search over other methods per tensor (it has no calibrator of its own)."""
        return bool(self.among)

    @property
    def hessian(self) -> bool:
        """Whether a Hessian of its layer's inputs may weight its error (option ``hessian``)."""
        return HESSIAN in self.bounds

    def applies_to(self, kind: TensorKind) -> bool:
        return kind in self.kinds

    def calibrates(self, format: str) -> bool:
        """Whether it calibrates tensors of the format called ``format``."""
        return self.formats is None or format in self.formats

    def calibrator_options(self, options: Mapping[str, float]) -> dict[str, float]:
        """``options`` that are its calibrator's constructor arguments (not ``hessian``, nor a
        step's options)."""
        skipped = {HESSIAN, *self.step_options}
        return {key: value for key, value in options.items() if key not in skipped}

    def check_options(self, options: object) -> None:
        """RecipeError naming the option, its value and what is allowed, for any option this
        method does not take or whose value (alone, or with the others) is out of range."""
        if not isinstance(options, Mapping):
            raise RecipeError(f"options must be a mapping of option: number, not {options!r}")
        unknown = [key for key in options if key not in self.options]
        if unknown:
            raise RecipeError(
                f"method {self.name!r} takes no option(s) {sorted(map(str, unknown))}; "
                f"it takes {sorted(self.options) or 'none'}"
            )
        for method in self.among or (self,):
            taken = {k: v for k, v in options.items() if k in method.bounds}
            for key, value in taken.items():
                bound = method.bounds[key]
                if not bound.admits(value):
                    raise RecipeError(
                        f"method {method.name!r} option {key}={value!r} is out of range: it "
                        f"must be {bound.describe()}"
                    )
            if method.rules is not None:
                method.rules({**method.defaults, **taken})


MAX = MethodSpec("max")
MSE = MethodSpec(
    "mse",
    bounds={key: MULTIPLIER for key in ("start", "stop", "step")},
    defaults={"start": 0.25, "stop": 4.0, "step": 0.1},
    rules=check_mse,
)
HIST_MSE = MethodSpec(
    "hist-mse",
    bounds={**MSE.bounds, "bins": Bound(2, MAX_BINS, integer=True)},
    defaults=MSE.defaults,
    rules=check_mse,
    block_activations=False,
)
NVFP4_MSE = MethodSpec(
    "nvfp4-mse",
    bounds={HESSIAN: Bound(0, 1, integer=True, flag=True)},
    kinds=frozenset({TensorKind.WEIGHT}),
    weight_only_reason=(
        "chooses per-block weight scales; NVFP4 activations get their block scales in the "
        "graph, so calibrate their global amax with max or mse"
    ),
    formats=("nvfp4",),
)
MX_MSE = MethodSpec(
    "mx-mse",
    kinds=frozenset({TensorKind.WEIGHT}),
    weight_only_reason=(
        "chooses per-block weight exponents; MX activations get theirs in the graph at run time"
    ),
    formats=("mxfp8", "mxfp4"),
)
GPTQ = MethodSpec(
    "gptq",
    bounds={
        "percdamp": Bound(0, 1),
        "act_order": Bound(0, 1, integer=True, flag=True),
        "lazy_block": Bound(1, MAX_LAZY_BLOCK, integer=True),
    },
    kinds=frozenset({TensorKind.WEIGHT}),
    weight_only_reason=(
        "rounds weights column by column, compensating each error with the layer input's "
        "Hessian; activations have no such Hessian: calibrate them with another method"
    ),
    formats=("int4", "uint4", "int8", "uint8"),
    full_hessian=True,
)
SHRINK_MSE = MethodSpec(
    "shrink-mse",
    bounds={
        "maxshrink": FRACTION,
        "grid": Bound(0, math.inf, open_low=True),
        "norm": Bound(0, MAX_NORM, open_low=True),
        "patience": Bound(1, math.inf, integer=True),
        "averaging_constant": FRACTION,
    },
    defaults={"maxshrink": 0.2, "grid": 100},
    rules=check_shrink_mse,
)
PERCENTILE = MethodSpec(
    "percentile",
    bounds={"percentile": Bound(0, 100, open_low=True), "bins": Bound(2, MAX_BINS, integer=True)},
)
ENTROPY = MethodSpec(
    "entropy",
    bounds={
        "bins": Bound(2, ENTROPY_MAX_BINS, integer=True),
        "quantized_bins": Bound(2, 2 * ENTROPY_MAX_BINS, integer=True),
        "max_clipped": FRACTION,
    },
    defaults={"bins": 2048, "max_clipped": 1e-3},
    rules=check_entropy,
)
AWQ_OPTIONS = {
    "grid": Bound(2, 100, integer=True),
    "clip": Bound(0, 1, integer=True, flag=True),
    "rows": Bound(1, 65536, integer=True),
}
"""AWQ's search: ``grid`` alphas in [0, 1], the per-block clip search on or off, and the input
rows per activation kept to measure a layer's output error on."""
AWQ = MethodSpec(
    "awq",
    bounds=AWQ_OPTIONS,
    kinds=frozenset({TensorKind.WEIGHT}),
    weight_only_reason=(
        "scales a layer's input channels against its weight's; activations are calibrated "
        "after, on the scaled model, with their own method"
    ),
    formats=("int4", "uint4", "int8"),
    step_options=frozenset(AWQ_OPTIONS),
)
AUTO = MethodSpec(
    "auto", kinds=frozenset({TensorKind.ACTIVATION}), among=(MAX, HIST_MSE, PERCENTILE, ENTROPY)
)

METHODS: dict[str, MethodSpec] = {
    method.name: method
    for method in (
        MAX,
        MSE,
        HIST_MSE,
        NVFP4_MSE,
        MX_MSE,
        GPTQ,
        SHRINK_MSE,
        PERCENTILE,
        ENTROPY,
        AWQ,
        AUTO,
    )
}
"""Every method by name, in the order the CLI and messages list them."""
DEFAULT_METHOD = MAX.name
METHOD_OPTIONS: dict[str, frozenset[str]] = {name: m.options for name, m in METHODS.items()}
"""The option keys each method takes (``MethodSpec.options``)."""


def method_names(kind: TensorKind | None = None) -> list[str]:
    """The methods' names, or those that calibrate ``kind`` tensors."""
    return [name for name, m in METHODS.items() if kind is None or m.applies_to(kind)]


def check_method_options(method: str, options: object) -> None:
    """``MethodSpec.check_options`` of the method called ``method`` (none for an unknown one)."""
    METHODS.get(method, MethodSpec(method)).check_options(options)
