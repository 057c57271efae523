"""A torch calibration as a QDQ ONNX model: ``torch.onnx.export`` of the float model, the
modules mapped onto its graph (graphs/torch_map.py), their scales laid out as the graph stores
each tensor, and the QDQ export with its checks. Nothing is recalibrated in the ONNX graph.

Where several modules meet in one ONNX tensor (q, k and v read one input; one module's output
is the next one's input) the tensor gets one QDQ pair with the widest of their ranges.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from qcal_export.artifacts.report import save_report, tensor_row
from qcal_export.artifacts.scales import save_scales, versions
from qcal_export.capture.data import DataSource
from qcal_export.capture.onnxruntime import open_session, select_providers
from qcal_export.capture.torch_hooks import ModuleTarget, evaluating
from qcal_export.errors import ModelError
from qcal_export.files.paths import check_outputs
from qcal_export.from_torch.node_map import (
    ModuleMap,
    ModuleWeights,
    NodeMatch,
    fold_weight_identities,
    map_modules,
)
from qcal_export.from_torch.plan import MappedPlan, plan_mapped
from qcal_export.graphs.export import ExportResult, export_qdq
from qcal_export.graphs.targets import name_nodes
from qcal_export.onnx_io.model_io import LoadedModel, load_model, save_model
from qcal_export.onnx_io.weights import WeightStore
from qcal_export.spec.recipe import Recipe
from qcal_export.spec.scales import TensorScales
from qcal_export.validation.validate import Validation, validate_outputs

log = logging.getLogger(__name__)


@dataclass
class TorchExportResult:
    """The QDQ model written, its scales under ONNX tensor names, and what was mapped.

    ``mapped``: module -> its nodes; ``unmapped`` and ``outputs_not_exported``: module -> why
    (those tensors stay in float in the ONNX model).
    """

    model_path: Path
    scales: dict[str, TensorScales]
    mapped: dict[str, list[NodeMatch]]
    unmapped: dict[str, str]
    outputs_not_exported: dict[str, str]
    notes: list[str]
    report: dict[str, Any] = field(default_factory=dict)
    scales_path: Path | None = None
    report_path: Path | None = None


@dataclass
class CalibratedModule:
    """A torch model's calibration as its export reads it: the float ``model``, the ``recipe``,
    the targeted modules, their scales (keyed ``<module>.input`` / ``.output`` / ``.weight``) and
    the model's forward calls in each capture pass (``TorchCalibration`` adds its methods)."""

    model: torch.nn.Module
    recipe: Recipe
    targets: list[ModuleTarget]
    scales: dict[str, TensorScales]
    batches_per_pass: list[int]


def export_onnx(
    calibrated: CalibratedModule,
    args: Any,
    path: str | Path,
    *,
    kwargs: dict[str, Any] | None,
    dynamo: bool,
    scales_path: str | Path | None,
    report_path: str | Path | None,
    validate: bool,
    export_options: dict[str, Any],
) -> TorchExportResult:
    """See ``TorchCalibration.export_onnx``; every file is written atomically."""
    check_outputs({"path": path, "scales": scales_path, "report": report_path})
    args = args if isinstance(args, tuple) else (args,)
    built = _build(calibrated, args, kwargs, dynamo, validate, export_options)
    _warn(built.module_map, built.mapped, len(calibrated.targets))
    try:
        model_path = save_model(built.exported.model, path, external_data=False)
    finally:
        built.store.release()
    result = TorchExportResult(
        model_path=model_path,
        scales=built.mapped.scales,
        mapped=built.module_map.mapped,
        unmapped=built.module_map.unmapped,
        outputs_not_exported=built.mapped.outputs_not_exported,
        notes=built.mapped.notes + built.exported.notes,
    )
    if scales_path is not None:
        result.scales_path = save_scales(scales_path, result.scales, built.sha256)
    result.report = {
        "exporter": "dynamo" if dynamo else "torchscript",
        "float_model_sha256": built.sha256,
        "output_model": str(result.model_path),
        "scales_file": str(result.scales_path) if result.scales_path else None,
        "recipe": calibrated.recipe.to_dict(),
        "batches_per_pass": calibrated.batches_per_pass,
        "opset": {"from": built.exported.opset_from, "to": built.exported.opset_to},
        "modules": built.mapped.modules,
        "unmapped_modules": result.unmapped,
        "outputs_not_exported": result.outputs_not_exported,
        "quantized_nodes": built.mapped.plan.nodes,
        "tensors": [tensor_row(s, {}) for s in result.scales.values()],
        "notes": result.notes,
        "validator": built.validation.output_validator if built.validation else None,
        "output_error": built.validation.output_error if built.validation else {},
        "validation": built.validation.to_report() if built.validation else None,
        "versions": versions(),
    }
    if report_path is not None:
        result.report_path = save_report(report_path, result.report)
    return result


@dataclass
class _Built:
    """The QDQ model of one export, how it came about, its output error, and the store of its
    weights (released once the model is written)."""

    exported: ExportResult
    sha256: str
    module_map: ModuleMap
    mapped: MappedPlan
    validation: Validation | None
    store: WeightStore


def _build(
    calibrated: CalibratedModule,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
    dynamo: bool,
    validate: bool,
    export_options: dict[str, Any],
) -> _Built:
    """Export the float model to a temporary file, map the modules and write the QDQ graph."""
    with tempfile.TemporaryDirectory(prefix="qcal-torch-export-") as tmp:
        float_path = Path(tmp) / "float.onnx"
        _export_float(calibrated.model, args, kwargs, dynamo, float_path, export_options)
        loaded = load_model(float_path)
        try:
            return _build_loaded(calibrated, loaded, float_path, args, kwargs, validate)
        except BaseException:
            loaded.store.release()
            raise


def _build_loaded(
    calibrated: CalibratedModule,
    loaded: LoadedModel,
    float_path: Path,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
    validate: bool,
) -> _Built:
    """``_build`` once the float model is loaded (its weights in ``loaded.store``)."""
    name_nodes(loaded.proto)
    fold_weight_identities(loaded.proto)
    module_map = map_targets(loaded.proto, calibrated.targets)
    if not module_map.mapped:
        reasons = "; ".join(f"{m}: {why}" for m, why in list(module_map.unmapped.items())[:3])
        raise ModelError(f"no targeted module could be mapped to the exported graph ({reasons})")
    mapped = plan_mapped(loaded.proto, module_map, calibrated.targets, calibrated.scales)
    recipe = calibrated.recipe
    exported = export_qdq(
        loaded.proto, mapped.plan, mapped.scales, recipe.weights_mode, recipe.nvfp4_form
    )
    validation = None
    if validate:
        validation = _validate(float_path, exported.model, args, kwargs, mapped.notes)
    return _Built(exported, loaded.sha256, module_map, mapped, validation, loaded.store)


def map_targets(model: onnx.ModelProto, targets: list[ModuleTarget]) -> ModuleMap:
    """Map the targeted modules; those without a weight cannot be found and say so."""
    weighed, weightless = [], []
    for target in targets:
        weight = getattr(target.module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            weighed.append(_module_weights(target, weight))
        else:
            weightless.append(target.name)
    found = map_modules(model, weighed)
    for name in weightless:
        found.unmapped[name] = "it has no weight parameter to find it by in the exported graph"
    return found


def _module_weights(target: ModuleTarget, weight: torch.Tensor) -> ModuleWeights:
    bias = getattr(target.module, "bias", None)
    layout = target.layout
    return ModuleWeights(
        target.name,
        _array(weight),
        _array(bias) if isinstance(bias, torch.Tensor) else None,
        None if layout is None else (layout.channel, layout.reduction),
    )


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _export_float(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
    dynamo: bool,
    path: Path,
    options: dict[str, Any],
) -> None:
    """``torch.onnx.export`` of the float model in eval mode; ModelError says what failed."""
    options = {"verbose": False, **options}
    with evaluating(model), torch.no_grad():
        try:
            torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=dynamo, **options)
        except ImportError as e:
            raise ModelError(
                f"torch.onnx.export(dynamo={dynamo}) needs {e.name or e}: install "
                "qcal-export[export] (onnxscript), or pass dynamo=False"
            ) from None
        except Exception as e:  # the exporters raise many types; the cause stays chained
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"torch.onnx.export of {type(model).__name__} failed: {first}") from e


def _validate(
    float_path: Path,
    exported: onnx.ModelProto,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
    notes: list[str],
) -> Validation | None:
    """The QDQ model against the float export on the example inputs, in ORT as users run it
    and in the reference (``validate.validate_outputs``); None where it cannot run."""
    values = [v for v in (*args, *(kwargs or {}).values()) if isinstance(v, torch.Tensor)]
    providers = select_providers("auto")
    names = [i.name for i in open_session(float_path, providers, "the float export").get_inputs()]
    if len(values) != len(names):
        notes.append(
            f"validation skipped: {len(values)} example tensors for the graph's inputs {names}"
        )
        return None
    feed = {name: v.detach().cpu().numpy() for name, v in zip(names, values, strict=True)}
    source = DataSource(lambda: iter([feed]), "example inputs")
    try:
        return validate_outputs(float_path, exported, providers, source, 1)
    except ModelError as e:  # the model passed onnx's checker: not even the reference runs it
        log.warning("output check skipped: %s", e)
        notes.append(f"output check skipped: {e}")
        return None


def _warn(module_map: ModuleMap, mapped: MappedPlan, total: int) -> None:
    if module_map.unmapped:
        log.warning(
            "%d of %d targeted modules could not be mapped to the ONNX graph and stay in float: %s",
            len(module_map.unmapped),
            total,
            "; ".join(f"{m}: {why}" for m, why in module_map.unmapped.items()),
        )
    for module, why in mapped.outputs_not_exported.items():
        log.warning("output of module %s is not quantized in the ONNX model: %s", module, why)
