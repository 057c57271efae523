"""Calibrate a torch model through forward hooks: ``calibrate_torch`` runs the data itself,
``capture`` lets a script run its own forward loop; both give a TorchCalibration.

Scales are named ``<module>.input``, ``<module>.output`` and ``<module>.weight``. Methods that
need an initial range (mse) take a second pass over the data; weights come from the parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcal_export.calibrate.decisions import tensor_scales
from qcal_export.calibrate.runtime_scales import is_runtime_scaled, runtime_record
from qcal_export.calibrate.tensor import (
    Collector,
    calibrate_weight,
    first_pass_calibrator,
    make_calibrator,
    named_collector,
    second_pass,
)
from qcal_export.calibrators import BlockHessian, Calibrator
from qcal_export.capture.torch_hooks import (
    Hooks,
    ModuleTarget,
    evaluating,
    find_modules,
    module_device,
    scale_key,
)
from qcal_export.errors import DataError, RecipeError
from qcal_export.from_torch.export import CalibratedModule, TorchExportResult, export_onnx
from qcal_export.pipeline.calibrate import ProgressFactory
from qcal_export.spec.formats import get_format
from qcal_export.spec.granularity import PerTensor
from qcal_export.spec.methods import AWQ
from qcal_export.spec.recipe import Recipe, TensorSpec
from qcal_export.spec.recipe_options import recipe_from_options
from qcal_export.spec.scales import TensorScales


@dataclass
class TorchCalibration(CalibratedModule):
    """Scales of a calibrated torch model, keyed ``<module>.input`` / ``.output`` / ``.weight``
    (``save_scales`` writes them), with the torch-side reference and the ONNX export.

    Fields (``CalibratedModule``): ``model``, ``recipe``, ``targets``, ``scales`` and
    ``batches_per_pass`` (the model's forward calls in each capture pass).
    """

    @property
    def modules(self) -> list[str]:
        """Names of the targeted modules, in ``named_modules`` order."""
        return [t.name for t in self.targets]

    @contextmanager
    def fake_quantize(self) -> Iterator[nn.Module]:
        """The model computing as its QDQ export: inputs and outputs fake-quantized with their
        scales, weights replaced by their fake-quantized values; all restored on exit. Without
        gradients, as the export computes: the fake quantization writes its results in place."""
        with torch.no_grad(), Hooks() as hooks, _fake_quant_weights(self.targets, self.scales):
            for target in self.targets:
                entry = self.scales.get(scale_key(target.name, "input"))
                if entry is not None:
                    hooks.on_input(target.module, functools.partial(fake_quant_activation, entry))
                entry = self.scales.get(scale_key(target.name, "output"))
                if entry is not None:
                    hooks.on_output(target.module, functools.partial(fake_quant_activation, entry))
            yield self.model

    def export_onnx(
        self,
        args: tuple[Any, ...],
        path: str | Path,
        *,
        kwargs: dict[str, Any] | None = None,
        dynamo: bool = True,
        scales: str | Path | None = None,
        report: str | Path | None = None,
        validate: bool = True,
        **export_options: Any,
    ) -> TorchExportResult:
        """Export the float model with ``torch.onnx.export`` and write its QDQ form to ``path``.

        The scales are mapped from module names to the exported graph, not recalibrated; the
        result (and ``report``) says which modules could not be mapped and why. ``scales``
        writes the scales under their ONNX tensor names. ``validate`` compares ONNX Runtime's
        outputs of the QDQ and float models on ``args``. ``export_options`` go to the exporter.
        """
        return export_onnx(
            self,
            args,
            path,
            kwargs=kwargs,
            dynamo=dynamo,
            scales_path=scales,
            report_path=report,
            validate=validate,
            export_options=export_options,
        )


def fake_quant_activation(scales: TensorScales, x: torch.Tensor) -> torch.Tensor:
    """``x`` through the QuantizeLinear -> DequantizeLinear pair its QDQ export gets (NVFP4:
    blocks of 16 along the last axis, MX: of 32 with their exponents from ``x``, a partial last
    block padded with zeros)."""
    fmt = get_format(scales.format)
    values = x.float()
    pad = -values.shape[-1] % fmt.block_size
    if pad:
        values = nn.functional.pad(values, (0, pad))
    if fmt.shared_exponent:
        out = fmt.fake_quant_dynamic(values)
    else:
        out = fmt.fake_quant(values, scales.scale.to(x.device), scales.zero_point.to(x.device))
    return out[..., : x.shape[-1]].to(x.dtype)


@contextmanager
def _fake_quant_weights(
    targets: list[ModuleTarget], scales: dict[str, TensorScales]
) -> Iterator[None]:
    """Every calibrated weight's data replaced by its fake-quantized values, then restored."""
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for target in targets:
                entry = scales.get(scale_key(target.name, "weight"))
                param = target.parameter
                if entry is None or param is None:
                    continue
                swapped.append((param, param.data))
                quantized = entry.fake_quant_weight(param.data.float().cpu())
                param.data = quantized.to(param.device, param.dtype)
        yield
    finally:
        for param, data in reversed(swapped):
            param.data = data


class TorchCapture:
    """Hooks on the targeted modules feeding one calibrator per input and output.

    As a context manager: the model in eval mode without gradients, hooks attached; both undone
    on exit, also on an error. Run the forward loop inside ``for _ in cal.passes():`` (two
    passes when a method needs an initial range), then ``cal.result()``.
    """

    def __init__(self, model: nn.Module, recipe: Recipe):
        self.model = model
        self.recipe = recipe
        self.targets = find_modules(model, recipe)
        if not self.targets:
            raise RecipeError(
                f"{type(model).__name__} has no module to calibrate: the recipe targets op types "
                f"{list(recipe.op_types)} (Linear: MatMul/Gemm, Conv, ConvTranspose) and module "
                f"types {list(recipe.module_types)}; add module_types or modules (name patterns)"
            )
        if any(t.weight is not None and t.weight.method == AWQ.name for t in self.targets):
            raise RecipeError(
                "weight method awq folds its factors into an ONNX graph: calibrate the exported "
                "model with calibrate_onnx, or give torch models another weight method"
            )
        self._specs: dict[str, TensorSpec] = {}
        self._cals: dict[str, Calibrator] = {}
        self._runtime: dict[str, TensorSpec] = {}  # MX inputs: scales computed at run time
        for t in self.targets:
            for key, spec, granularity in (
                (scale_key(t.name, "input"), t.activation, t.input_granularity),
                (scale_key(t.name, "output"), t.output, PerTensor()),
            ):
                if spec is not None and is_runtime_scaled(spec):
                    self._runtime[key] = spec
                elif spec is not None:
                    self._specs[key] = spec
                    self._cals[key] = make_calibrator(spec, granularity, recipe.nonfinite)
        self._firsts = {key: first_pass_calibrator(cal) for key, cal in self._cals.items()}
        self._hessians = {t.name: BlockHessian() for t in self.targets if _wants_hessian(t)}
        self._sinks: dict[str, list[Collector]] = {}
        for key, cal in self._firsts.items():
            self._sinks.setdefault(key, []).append(named_collector(key, cal.collect))
        for name, accumulator in self._hessians.items():
            self._sinks.setdefault(scale_key(name, "input"), []).append(accumulator.collect)
        self._second: dict[str, Calibrator] | None = None
        self._second_done = False
        self._sinks_used = bool(self._sinks)
        self.batches_per_pass = [0]
        self._captured = [0]
        self._stack = ExitStack()

    @property
    def needs_second_pass(self) -> bool:
        return any(cal.needs_initial_range for cal in self._cals.values())

    def __enter__(self) -> TorchCapture:
        with ExitStack() as stack:
            stack.enter_context(evaluating(self.model))
            stack.enter_context(torch.no_grad())
            hooks = stack.enter_context(Hooks())
            hooks.on_call(self.model, self._count_batch)
            for t in self.targets:
                for key, attach in (
                    (scale_key(t.name, "input"), hooks.on_input),
                    (scale_key(t.name, "output"), hooks.on_output),
                ):
                    if key in self._sinks:
                        attach(t.module, functools.partial(self._feed, key))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def passes(self) -> Iterator[int]:
        """Yield 1, then 2 if a method needs the first pass's range; run the data each time."""
        if self._second is not None:
            raise RecipeError("passes() was already run for this capture: start a new capture")
        yield 1
        self._end_first_pass()
        if self._second:
            yield 2
            self._second_done = True

    def result(self) -> TorchCalibration:
        """Scales of every targeted input, output and weight."""
        if self._second is None:
            self._end_first_pass()
        if self._second and not self._second_done:
            methods = sorted({f"{key} ({self._specs[key].method})" for key in self._second})
            raise RecipeError(
                f"{', '.join(methods[:4])} need a second pass over the data: run the forward "
                "loop inside `for _ in cal.passes():`"
            )
        ran = [b or c for b, c in zip(self.batches_per_pass, self._captured, strict=True)]
        if self._sinks_used and not all(ran):
            raise DataError(
                f"{type(self.model).__name__} did not run during pass {ran.index(0) + 1}: run "
                "the model on calibration data inside the capture"
            )
        scales = {
            key: tensor_scales(key, "activation", self._specs[key], cal, PerTensor())
            for key, cal in self._cals.items()
        }
        scales.update({key: runtime_record(key, spec) for key, spec in self._runtime.items()})
        scales.update(self._weight_scales())
        return TorchCalibration(
            self.model, self.recipe, self.targets, scales, list(self.batches_per_pass)
        )

    def _weight_scales(self) -> dict[str, TensorScales]:
        """Every targeted weight calibrated from its parameter, on its own device."""
        scales = {}
        for target in self.targets:
            param = target.parameter
            if param is None or target.weight is None or target.weight_granularity is None:
                continue
            key = scale_key(target.name, "weight")
            accumulator = self._hessians.get(target.name)
            hessian = accumulator.hessian if accumulator is not None else None
            scales[key] = calibrate_weight(
                key,
                param.detach(),
                target.weight,
                target.weight_granularity,
                self.recipe.nonfinite,
                hessian,
            )
            scales[key].notes.extend(target.notes)
        return scales

    def _end_first_pass(self) -> None:
        self._second = second_pass(self._cals, self._firsts)
        self._sinks = {k: [named_collector(k, c.collect)] for k, c in self._second.items()}
        if self._second:
            self.batches_per_pass.append(0)
            self._captured.append(0)

    def _count_batch(self) -> None:
        self.batches_per_pass[-1] += 1

    def _feed(self, key: str, value: torch.Tensor) -> None:
        self._captured[-1] += 1
        for collect in self._sinks.get(key, ()):
            collect(value.detach())


def _wants_hessian(target: ModuleTarget) -> bool:
    """A Hessian-weighted nvfp4-mse weight of a Linear: ``H`` comes from its input."""
    return bool(target.is_linear and target.weight and target.weight.options.get("hessian"))


def capture(model: nn.Module, recipe: Recipe | None = None, **options: Any) -> TorchCapture:
    """Hooks for a script's own forward loop, as a context manager.

    ``with capture(model, recipe) as cal:`` then ``for _ in cal.passes(): <forward loop>``
    (or the loop alone for single-pass methods), and ``cal.result()``. ``options`` build the
    recipe when none is given (``format``, ``method``, ...: see ``recipe_options.build_recipe``).
    """
    # Hooks quantize the targeted modules' inputs, as TensorRT's placement does; the ort
    # target's placement (and its uint8 activations for int8) is the ONNX path's.
    return TorchCapture(model, recipe_from_options(recipe, {"target": "tensorrt", **options}))


def calibrate_torch(
    model: nn.Module,
    data: Iterable[Any],
    recipe: Recipe | None = None,
    *,
    max_batches: int | None = None,
    progress: ProgressFactory | None = None,
    **options: Any,
) -> TorchCalibration:
    """Calibrate the targeted modules of ``model`` on ``data``, and their weights.

    ``data``: batches as a DataLoader yields them: a tensor runs ``model(t)``, a tuple or list
    ``model(*b)``, a dict ``model(**b)``; tensors move to the model's device. Methods taking
    two passes need re-iterable data (a list, a DataLoader). ``options`` build the recipe when
    none is given. The model's training flags are left as found and no hook stays behind.
    """
    session = capture(model, recipe, **options)
    if isinstance(data, (torch.Tensor, Mapping)) or not isinstance(data, Iterable):
        raise DataError(
            f"data is a {type(data).__name__}, not an iterable of batches: give a list of "
            "batches ([x] for one), a DataLoader or another iterable"
        )
    if session.needs_second_pass and isinstance(data, Iterator):
        raise DataError(
            "the calibration data is a one-shot iterator but the recipe's method takes a second "
            "pass over it: pass a re-iterable such as a list or a DataLoader"
        )
    device = module_device(model)
    with session:
        for number in session.passes():
            label = f"calibrating (pass {number})"
            with progress(label) if progress else nullcontext() as on_batch:
                _run_pass(model, data, device, max_batches, on_batch)
    return session.result()


def _run_pass(
    model: nn.Module,
    data: Iterable[Any],
    device: torch.device | None,
    max_batches: int | None,
    on_batch: Any,
) -> None:
    for index, batch in enumerate(data):
        if max_batches is not None and index >= max_batches:
            break
        batch = _to_device(batch, device)
        if isinstance(batch, torch.Tensor):
            model(batch)
        elif isinstance(batch, (tuple, list)):
            model(*batch)
        elif isinstance(batch, Mapping):
            model(**batch)
        else:
            raise DataError(
                f"batch {index} is a {type(batch).__name__}: give a tensor, a tuple or list of "
                "positional arguments, or a dict of keyword arguments"
            )
        if on_batch is not None:
            on_batch()


def _to_device(value: Any, device: torch.device | None) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value
