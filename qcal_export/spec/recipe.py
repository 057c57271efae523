"""Recipes: which nodes are quantized, and which format, granularity and method each tensor gets.

A recipe is typed data, built in Python or loaded from YAML/JSON, validated before any batch runs.
Overrides match nodes by name pattern (``fnmatch``) and op type; the first match wins.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qcal_export.errors import RecipeError
from qcal_export.spec.choices import NonFinite, NVFP4Form, Target, TensorKind, WeightsMode
from qcal_export.spec.formats import FORMATS
from qcal_export.spec.methods import DEFAULT_METHOD, METHODS

DEFAULT_OP_TYPES = (
    *("MatMul", "Gemm", "Conv", "ConvTranspose"),
    *("Add", "Mul", "Concat", "Sigmoid", "LeakyRelu", "Softmax"),
    *("MaxPool", "AveragePool", "GlobalAveragePool", "Resize", "Gather"),
    *("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Split"),
)
"""The compute ops, and the ops a deployment target places Q/DQ around (what each target does
with them: ``graphs.op_inputs.PLACEMENTS``)."""
DEFAULT_TARGET = Target.ORT
"""ONNX Runtime's placement, as its QDQ quantizer does it: the model runs on ORT's integer
kernels wherever they exist, while the residual stream feeding a normalization stays float
(``graphs.placement``), so max calibration needs no range for its outlier channels."""
MAX_BLOCK_SIZE = 4096
"""Largest weight block (blocks in use are 16 to 256): calibration pads every row of a weight to
a whole number of blocks, so a block wider than the reduction axis costs rows * block_size."""
SPEC_KEYS = ("activation", "weight", "output")
CHOICES = {
    "nvfp4_form": NVFP4Form,
    "target": Target,
    "weights_mode": WeightsMode,
    "nonfinite": NonFinite,
}
"""The Recipe fields that are fixed choices, in the order they are checked."""
NAME_LISTS = ("op_types", "exclude_nodes", "exclude_op_types", "module_types", "modules")


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor is quantized: format name, method name and the method's options.

    ``per_channel`` and ``block_size`` apply to weights: one scale per output channel, or per
    block of ``block_size`` along the reduction axis (int4 defaults to 128, nvfp4 is always 16).
    Activations get one scale per tensor, as ONNX Runtime and TensorRT consume them (nvfp4
    activations: a per-tensor global scale, block scales computed in the graph).
    """

    format: str = "int8"
    method: str = DEFAULT_METHOD
    per_channel: bool = False
    block_size: int | None = None
    options: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, allowed in (("format", sorted(FORMATS)), ("method", list(METHODS))):
            value = getattr(self, key)
            if not isinstance(value, str) or value not in allowed:
                raise RecipeError(f"unknown {key} {value!r}: choose one of {allowed}")
        method = METHODS[self.method]
        if not method.calibrates(self.format):
            raise RecipeError(
                f"method {self.method!r} needs format {' or '.join(method.formats)}, "
                f"not {self.format!r}"
            )
        if not isinstance(self.per_channel, bool):
            raise RecipeError(f"per_channel must be true or false, not {self.per_channel!r}")
        if self.block_size is None:
            object.__setattr__(self, "block_size", FORMATS[self.format].default_block_size)
        size = self.block_size
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, int) or not 2 <= size <= MAX_BLOCK_SIZE
        ):
            raise RecipeError(
                f"block_size must be an integer >= 2 and <= {MAX_BLOCK_SIZE}, not {size!r}"
            )
        fixed = FORMATS[self.format].block_size
        if fixed > 1 and self.block_size != fixed:
            raise RecipeError(f"{self.format} blocks are {fixed} elements, not {self.block_size}")
        method.check_options(self.options)


@dataclass(frozen=True)
class Override:
    """Specs for the nodes whose name matches ``nodes`` and whose op type is in ``op_types``.

    ``activation`` or ``weight`` set to None leaves that input in float; ``output`` (torch
    modules) quantizes the module's output, None leaves it in float. In torch, ``nodes`` matches
    module names and ``op_types`` module class names (or the ONNX op types they export to).
    """

    nodes: str = "*"
    op_types: tuple[str, ...] = ()
    activation: TensorSpec | None = None
    weight: TensorSpec | None = None
    output: TensorSpec | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.nodes, str):
            raise RecipeError(
                f"override nodes must be a name pattern (a string), not {self.nodes!r}"
            )
        where = f"override {self.nodes!r}"
        object.__setattr__(self, "op_types", _names(self.op_types, f"{where} op_types"))
        for key in SPEC_KEYS:
            _check_spec_type(getattr(self, key), f"{where} {key}")
        _check_activation_spec(self.activation, f"override {self.nodes!r}")
        _check_activation_spec(self.output, f"override {self.nodes!r} output")

    def matches(self, node_name: str, op_type: str) -> bool:
        by_type = not self.op_types or op_type in self.op_types
        return by_type and fnmatch.fnmatchcase(node_name, self.nodes)


@dataclass(frozen=True)
class Recipe:
    """The whole plan: node selection, default specs, overrides and export options.

    ``activation`` or ``weight`` None leaves those inputs in float (weight-only quantization);
    ``nvfp4_form`` picks how NVFP4 activations are written (standard ops, or TensorRT's op).
    ``target`` the runtime whose Q/DQ placement the model follows: "ort" (ONNX Runtime's QDQ
    quantizer: integer element-wise ops, scales shared through data movement) or "tensorrt"
    (TensorRT's placement rules: compute-op inputs, residual Adds, pooling inputs).
    Torch capture only: ``output`` quantizes module outputs (None: left in float);
    ``module_types`` (class names) and ``modules`` (module name patterns) add targets beside
    Linear, Conv and ConvTranspose. Overrides only choose specs: they add no target.
    """

    activation: TensorSpec | None = TensorSpec()
    weight: TensorSpec | None = TensorSpec(per_channel=True)
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()
    weights_mode: WeightsMode = WeightsMode.QUANTIZED
    nonfinite: NonFinite = NonFinite.SKIP
    nvfp4_form: NVFP4Form = NVFP4Form.PORTABLE
    target: Target = DEFAULT_TARGET
    output: TensorSpec | None = None
    module_types: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in SPEC_KEYS:
            _check_spec_type(getattr(self, key), key)
        for key in NAME_LISTS:
            object.__setattr__(self, key, _names(getattr(self, key), key))
        overrides = self.overrides
        if not isinstance(overrides, list | tuple) or not all(
            isinstance(o, Override) for o in overrides
        ):
            raise RecipeError(f"overrides must be a list of overrides, not {overrides!r}")
        object.__setattr__(self, "overrides", tuple(overrides))
        _check_activation_spec(self.activation, "recipe")
        _check_activation_spec(self.output, "recipe output")
        for key, choice in CHOICES.items():
            object.__setattr__(self, key, choice.parse(getattr(self, key), key))

    def excludes(self, node_name: str, op_type: str) -> bool:
        return op_type in self.exclude_op_types or any(
            fnmatch.fnmatchcase(node_name, pattern) for pattern in self.exclude_nodes
        )

    def specs_for(
        self, node_name: str, op_type: str
    ) -> tuple[TensorSpec | None, TensorSpec | None]:
        """(activation spec, weight spec) for a node; None means leave that input in float."""
        for override in self.overrides:
            if override.matches(node_name, op_type):
                return override.activation, override.weight
        return self.activation, self.weight

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_spec_type(spec: object, where: str) -> None:
    if spec is not None and not isinstance(spec, TensorSpec):
        raise RecipeError(f"{where} must be a TensorSpec or None, not {spec!r}")


def _check_activation_spec(spec: TensorSpec | None, where: str) -> None:
    """RecipeError for an activation spec that only weights can take."""
    if spec is None:
        return
    if FORMATS[spec.format].weight_only:
        raise RecipeError(
            f"{where}: {spec.format} is a weight format; give activations another format "
            "or none (activation: null) for weight-only quantization"
        )
    method = METHODS[spec.method]
    if not method.applies_to(TensorKind.ACTIVATION):
        raise RecipeError(f"{where}: {method.name} {method.weight_only_reason}")


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe from a YAML or JSON file; RecipeError names the file and the bad key."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file {path} does not exist")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} is not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix != ".json" else json.loads(text)
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"recipe file {path} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    except (yaml.YAMLError, json.JSONDecodeError, RecursionError) as e:
        raise RecipeError(f"recipe file {path} is not valid YAML/JSON: {e}") from None
    except OSError as e:
        raise RecipeError(f"recipe file {path} cannot be read: {e.strerror or e}") from None
    try:
        return recipe_from_dict({} if data is None else data)
    except RecipeError as e:
        raise RecipeError(f"recipe file {path}: {e}") from None


def recipe_from_dict(data: Mapping[str, Any]) -> Recipe:
    """Build a Recipe from plain data, rejecting unknown keys and values of the wrong type."""
    kwargs = _fields(Recipe, data, "recipe")
    for key in SPEC_KEYS:
        if kwargs.get(key) is not None:
            kwargs[key] = _spec(kwargs[key], key)
    for key in NAME_LISTS:
        if key in kwargs:
            kwargs[key] = _names(kwargs[key], key)
    if "overrides" in kwargs:
        overrides = kwargs["overrides"]
        if not isinstance(overrides, list | tuple):
            raise RecipeError(f"overrides must be a list of mappings, not {overrides!r}")
        kwargs["overrides"] = tuple(_override(o, i) for i, o in enumerate(overrides))
    return Recipe(**kwargs)


def _override(data: Mapping[str, Any], index: int) -> Override:
    where = f"overrides[{index}]"
    kwargs = _fields(Override, data, where)
    if "op_types" in kwargs:
        kwargs["op_types"] = _names(kwargs["op_types"], f"{where}.op_types")
    for key in SPEC_KEYS:
        if kwargs.get(key) is not None:
            kwargs[key] = _spec(kwargs[key], f"{where}.{key}")
    try:
        return Override(**kwargs)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None


def _spec(data: Mapping[str, Any] | TensorSpec, where: str) -> TensorSpec:
    if isinstance(data, TensorSpec):
        return data
    try:
        return TensorSpec(**_fields(TensorSpec, data, where))
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None


def _names(value: Any, where: str) -> tuple[str, ...]:
    """A list of names; a bare string would otherwise be split into characters."""
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{where} must be a list of strings, not {value!r}")
    return tuple(value)


def _fields(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where} must be a mapping, not {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = [key for key in data if key not in known]
    if unknown:
        raise RecipeError(
            f"{where}: unknown key(s) {sorted(map(str, unknown))}; known: {sorted(known)}"
        )
    return dict(data)
