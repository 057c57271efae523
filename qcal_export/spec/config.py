"""One calibration's options as one typed value: ``CalibrationConfig``, validated when built,
written as plain data (JSON/YAML) and read back; each field carries its ``qcal calibrate`` flag.

The groups (config_groups.py) follow what the options decide: the outputs, the recipe
(``quantization``), the batches (``data``), the capture device, validation, the accuracy steps
and the resumable state. Option names are unique across groups, so flat keywords
(``calibrate_onnx(..., format="fp8", output="q.onnx")``) name one option each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from qcal_export.errors import RecipeError
from qcal_export.spec.checks import check_smooth_scales
from qcal_export.spec.config_accuracy import AccuracyConfig
from qcal_export.spec.config_groups import (
    CaptureConfig,
    DataConfig,
    OutputConfig,
    QuantizationOptions,
    StateConfig,
    ValidationConfig,
)
from qcal_export.spec.recipe import Recipe, recipe_from_dict

GROUPS = {
    "outputs": OutputConfig,
    "quantization": QuantizationOptions,
    "data": DataConfig,
    "capture": CaptureConfig,
    "validation": ValidationConfig,
    "accuracy": AccuracyConfig,
    "state": StateConfig,
}
"""The config's groups, in the order they are checked."""


@dataclass(frozen=True)
class CalibrationConfig:
    """Everything ``calibrate_onnx`` is asked to do, besides the model and the data.

    Built from groups, from flat keywords (``from_options``) or from plain data (``from_dict``,
    ``load_config``); every option is checked when it is built (RecipeError naming it).
    """

    outputs: OutputConfig = field(default_factory=OutputConfig)
    quantization: QuantizationOptions = field(default_factory=QuantizationOptions)
    data: DataConfig = field(default_factory=DataConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    accuracy: AccuracyConfig = field(default_factory=AccuracyConfig)
    state: StateConfig = field(default_factory=StateConfig)

    def __post_init__(self) -> None:
        for name, group in GROUPS.items():
            if not isinstance(getattr(self, name), group):
                raise RecipeError(f"config group {name} must be a {group.__name__}")
        check_smooth_scales(self.accuracy.smooth, self.quantization.scales_in)

    @classmethod
    def from_options(cls, **options: Any) -> CalibrationConfig:
        """A config from flat keywords (``format="fp8"``, ``output=...``, ``state_every=10``);
        RecipeError for a keyword that is no option."""
        names = option_names()
        unknown = set(options) - set(names)
        if unknown:
            raise RecipeError(f"unknown option(s) {sorted(unknown)}; known: {list(names)}")
        grouped: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        for key, value in options.items():
            grouped[names[key]][key] = value
        return cls(**{name: GROUPS[name](**grouped[name]) for name in GROUPS})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationConfig:
        """A config from ``to_dict``'s plain data (missing keys keep their defaults);
        RecipeError names a key that is no group or option."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"a config is a mapping of groups, not {data!r}")
        unknown = set(data) - set(GROUPS)
        if unknown:
            raise RecipeError(f"unknown config group(s) {sorted(unknown)}; known: {list(GROUPS)}")
        groups = {}
        for name, values in data.items():
            if not isinstance(values, Mapping):
                raise RecipeError(f"config group {name} must be a mapping, not {values!r}")
            fields = {f.name: f for f in dataclasses.fields(GROUPS[name])}
            bad = set(values) - set(fields)
            if bad:
                raise RecipeError(
                    f"unknown option(s) {sorted(bad)} in config group {name}; known: {list(fields)}"
                )
            groups[name] = GROUPS[name](
                **{key: _typed(fields[key], value) for key, value in values.items()}
            )
        return cls(**groups)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The config as plain data (strings, numbers, lists, mappings), as ``from_dict`` reads
        it; RecipeError for a value that is not (an iterable passed as ``validate_data``)."""
        return {name: _plain_group(getattr(self, name), strict=True) for name in GROUPS}

    def record(self) -> dict[str, dict[str, Any]]:
        """``to_dict`` with any value that is not plain data named by its type: what a state
        file or a report records of the run's options."""
        return {name: _plain_group(getattr(self, name), strict=False) for name in GROUPS}

    def to_yaml(self) -> str:
        """``to_dict`` as YAML text (``from_yaml`` reads it back; JSON is YAML too)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> CalibrationConfig:
        """A config from YAML or JSON text."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"config is not valid YAML/JSON: {e}") from None
        return cls.from_dict({} if data is None else data)

    def replace(self, **options: Any) -> CalibrationConfig:
        """This config with some flat options changed (checked again)."""
        names = option_names()
        unknown = set(options) - set(names)
        if unknown:
            raise RecipeError(f"unknown option(s) {sorted(unknown)}; known: {list(names)}")
        changed = {}
        for name in GROUPS:
            mine = {k: v for k, v in options.items() if names[k] == name}
            if mine:
                changed[name] = dataclasses.replace(getattr(self, name), **mine)
        return dataclasses.replace(self, **changed)


def load_config(path: str | Path) -> CalibrationConfig:
    """Read a config from a YAML or JSON file; RecipeError names the file and the bad key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"config file {path} cannot be read: {e}") from None
    try:
        return CalibrationConfig.from_yaml(text)
    except RecipeError as e:
        raise RecipeError(f"config file {path}: {e}") from None


def option_names() -> dict[str, str]:
    """Every option's name (unique across groups) -> its group's name."""
    return {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


def option_fields() -> Iterator[tuple[str, dataclasses.Field]]:
    """(group name, field) for every option, in the groups' order."""
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            yield group, f


def _typed(f: dataclasses.Field, value: Any) -> Any:
    """A plain value as the field holds it: lists as tuples, a recipe mapping as a Recipe."""
    if isinstance(f.default, tuple) and isinstance(value, list):
        return tuple(value)
    if f.name == "recipe" and isinstance(value, Mapping):
        return recipe_from_dict(value)
    return value


def _plain_group(group: Any, *, strict: bool) -> dict[str, Any]:
    return {
        f.name: _plain(getattr(group, f.name), f.name, strict) for f in dataclasses.fields(group)
    }


def _plain(value: Any, name: str, strict: bool) -> Any:
    """``value`` as JSON/YAML data: paths and choices as strings, tuples as lists, a Recipe as
    its dict."""
    if isinstance(value, Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Recipe):
        return _plain(value.to_dict(), name, strict)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, name, strict) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, name, strict) for v in value]
    if strict:
        raise RecipeError(
            f"{name} holds a {type(value).__name__}, which a config file cannot hold: give a "
            "path instead to save the config"
        )
    return f"<{type(value).__name__}>"
