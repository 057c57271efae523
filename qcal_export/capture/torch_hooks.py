"""Torch capture: which modules a recipe targets, their weight layouts, and forward hooks that
hand each module's input and output to a callback, all removed together (also on an error).

Targets: nn.Linear, nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d whose ONNX op type (MatMul or
Gemm, Conv, ConvTranspose) the recipe's ``op_types`` lists, module classes named in
``Recipe.module_types`` and modules whose name matches a ``Recipe.modules`` pattern. Overrides
choose the specs of targets (``nodes`` matches module names) and add none. ``exclude_nodes``
matches module names, ``exclude_op_types`` class names or ONNX op types.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qcal_export.errors import RecipeError
from qcal_export.spec.formats import get_format
from qcal_export.spec.granularity import Granularity, PerAxis, PerBlock, PerTensor, PerTensorGroup
from qcal_export.spec.recipe import Override, Recipe, TensorSpec


@dataclass(frozen=True)
class WeightLayout:
    """Axes of a module's weight as torch stores it: output channels and reduction (inputs)."""

    channel: int
    reduction: int


MODULE_KINDS: tuple[tuple[tuple[type[nn.Module], ...], tuple[str, ...], WeightLayout], ...] = (
    ((nn.Linear,), ("MatMul", "Gemm"), WeightLayout(0, 1)),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), ("Conv",), WeightLayout(0, 1)),
    (
        (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
        ("ConvTranspose",),
        WeightLayout(1, 0),
    ),
)
"""Module classes targeted by default, the ONNX op types they export to, and their weight
layout: Linear ``[out, in]``, Conv ``[out, in / g, *k]``, ConvTranspose ``[in, out / g, *k]``."""


@dataclass
class ModuleTarget:
    """A module to calibrate: specs for its input, weight and output (None: left in float).

    ``layout`` is None for module types whose weight layout is unknown (per-tensor weights);
    ``input_granularity`` is how its input is collected (block formats: per tensor in blocks).
    """

    name: str
    module: nn.Module
    kinds: tuple[str, ...]
    activation: TensorSpec | None
    weight: TensorSpec | None
    output: TensorSpec | None
    layout: WeightLayout | None
    input_granularity: Granularity = field(default_factory=PerTensor)
    weight_granularity: Granularity | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def parameter(self) -> torch.Tensor | None:
        """The weight calibrated from the parameters, when the recipe asks for one."""
        return _weight(self.module) if self.weight is not None else None

    @property
    def is_linear(self) -> bool:
        return isinstance(self.module, nn.Linear)


def scale_key(module: str, what: str) -> str:
    """Name of a module's scales: ``<module>.input``, ``.output``, ``.weight`` (the root
    module's: ``input``, ``output``, ``weight``, as its parameter is named)."""
    return f"{module}.{what}" if module else what


def module_kinds(module: nn.Module) -> tuple[str, ...]:
    """Names an override's ``op_types`` may give for ``module``: class, then ONNX op types."""
    for classes, op_types, _ in MODULE_KINDS:
        if isinstance(module, classes):
            return (type(module).__name__, *op_types)
    return (type(module).__name__,)


def find_modules(model: nn.Module, recipe: Recipe) -> list[ModuleTarget]:
    """The modules of ``model`` the recipe targets, checked before any batch runs.

    RecipeError for what cannot work: a block format on an input whose blocks are unknown, or
    a block-format weight of unknown layout.
    """
    targets = []
    for name, module in model.named_modules():
        kinds = module_kinds(module)
        if not _selected(recipe, name, module, kinds) or _excluded(recipe, name, kinds):
            continue
        override = override_for(recipe, name, kinds)
        source: Recipe | Override = override or recipe
        specs = (source.activation, source.weight, source.output)
        if _weight(module) is None:
            specs = (specs[0], None, specs[2])
        if specs == (None, None, None):
            continue
        target = ModuleTarget(name, module, kinds, *specs, layout=_layout(module))
        _plan_granularities(target)
        targets.append(target)
    return targets


def override_for(recipe: Recipe, name: str, kinds: tuple[str, ...]) -> Override | None:
    """The first override matching ``name`` whose op types (if any) hold one of ``kinds``."""
    return next((o for o in recipe.overrides if any(o.matches(name, kind) for kind in kinds)), None)


def _selected(recipe: Recipe, name: str, module: nn.Module, kinds: tuple[str, ...]) -> bool:
    if _layout(module) is not None and set(kinds[1:]) & set(recipe.op_types):
        return True
    return kinds[0] in recipe.module_types or any(
        fnmatch.fnmatchcase(name, pattern) for pattern in recipe.modules
    )


def _excluded(recipe: Recipe, name: str, kinds: tuple[str, ...]) -> bool:
    return any(recipe.excludes(name, kind) for kind in kinds)


def _layout(module: nn.Module) -> WeightLayout | None:
    return next((lay for classes, _, lay in MODULE_KINDS if isinstance(module, classes)), None)


def _weight(module: nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight
    return None


def _plan_granularities(target: ModuleTarget) -> None:
    """Set the weight granularity in torch's layout and the input's collection granularity."""
    where = f"module {target.name!r} ({target.kinds[0]})"
    if target.output is not None and get_format(target.output.format).block_size > 1:
        raise RecipeError(
            f"{where}: {target.output.format} outputs take their blocks along the next layer's "
            "reduction axis, unknown here: quantize the next module's input instead"
        )
    if target.activation is not None and get_format(target.activation.format).block_size > 1:
        if not target.is_linear:
            raise RecipeError(
                f"{where}: {target.activation.format} activation blocks run along the "
                "reduction axis, known only for Linear inputs (the last axis): give this "
                "module another activation format or exclude it"
            )
        size = get_format(target.activation.format).block_size
        target.input_granularity = PerTensorGroup(-1, size)
    spec = target.weight
    if spec is None:
        return
    layout = target.layout
    if layout is None:
        if spec.block_size is not None:
            raise RecipeError(
                f"{where}: the layout of its weight is unknown, so blocks of {spec.block_size} "
                "cannot be placed; give it a per-tensor weight spec or exclude it"
            )
        if spec.per_channel:
            target.notes.append("weight layout unknown: calibrated per tensor")
        target.weight_granularity = PerTensor()
    elif spec.block_size is not None:
        target.weight_granularity = PerBlock(layout.reduction, spec.block_size)
    elif spec.per_channel:
        target.weight_granularity = PerAxis(layout.channel)
    else:
        target.weight_granularity = PerTensor()


TensorCallback = Callable[[torch.Tensor], "torch.Tensor | None"]
"""Gets a captured tensor (float, non-empty); returning a tensor replaces it in the forward pass."""


class Hooks:
    """Forward hooks registered through one object and removed together by ``remove()``.

    A module's input is its first tensor argument (positional, else keyword); its output is
    the tensor it returns, or the first tensor of a returned tuple or list. Empty and non-float
    tensors (an MoE expert that got no tokens, token ids) never reach the callback.
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def on_input(self, module: nn.Module, callback: TensorCallback) -> None:
        def hook(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            for index, value in enumerate(args):
                if isinstance(value, torch.Tensor):
                    new = _call(callback, value)
                    return (
                        None if new is None else ((*args[:index], new, *args[index + 1 :]), kwargs)
                    )
            for key, value in kwargs.items():
                if isinstance(value, torch.Tensor):
                    new = _call(callback, value)
                    return None if new is None else (args, {**kwargs, key: new})
            return None

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def on_output(self, module: nn.Module, callback: TensorCallback) -> None:
        def hook(_: nn.Module, args: tuple, output: Any) -> Any:
            if isinstance(output, torch.Tensor):
                return _call(callback, output)
            if isinstance(output, (tuple, list)):
                for index, value in enumerate(output):
                    if isinstance(value, torch.Tensor):
                        new = _call(callback, value)
                        if new is None:
                            return None
                        items = [*output[:index], new, *output[index + 1 :]]
                        named = hasattr(output, "_fields")  # a namedtuple takes positional fields
                        return type(output)(*items) if named else type(output)(items)
            return None

        self._handles.append(module.register_forward_hook(hook))

    def on_call(self, module: nn.Module, callback: Callable[[], None]) -> None:
        """Call ``callback`` before every forward call of ``module``."""
        self._handles.append(module.register_forward_pre_hook(lambda *_: callback()))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _call(callback: TensorCallback, value: torch.Tensor) -> torch.Tensor | None:
    if value.numel() == 0 or not value.is_floating_point():
        return None
    return callback(value)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode, every module's own training flag restored afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def module_device(model: nn.Module) -> torch.device | None:
    """Device of the model's first parameter (or buffer); None for a model with neither."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None
