"""The calibration step of a run: scales read from ``scales_in``, or activations captured with
one ONNX Runtime session and calibrated, then the weights, on the GPU the run captures on."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from qcal_export.artifacts.scales import load_scales
from qcal_export.calibrate.activations import calibrate_activations, hessian_inputs
from qcal_export.calibrate.gptq_weights import compensate_weights, gptq_weights
from qcal_export.calibrate.runtime_scales import calibrated_part, runtime_scale_records
from qcal_export.calibrate.tensor import Collector, calibrate_weights
from qcal_export.calibrators.threads import host_workers
from qcal_export.capture.onnxruntime import OrtCapture
from qcal_export.errors import DataError, RecipeError
from qcal_export.graphs.export import check_scales_match
from qcal_export.onnx_io.tensor_types import tensor_types
from qcal_export.pipeline.run import Run
from qcal_export.spec.config import CalibrationConfig
from qcal_export.spec.methods import METHODS
from qcal_export.spec.plan import Plan
from qcal_export.spec.scales import TensorScales

log = logging.getLogger(__name__)

ProgressFactory = Callable[[str], AbstractContextManager[Callable[[], None]]]
"""Given a label, a context manager yielding a callback called once per batch."""


def calibrate_scales(
    run: Run, config: CalibrationConfig, progress: ProgressFactory | None
) -> dict[str, TensorScales]:
    """Scales for every planned tensor: read from ``scales_in`` or calibrated now."""
    scales_in = config.quantization.scales_in
    if scales_in is not None:
        found, header = load_scales(scales_in)
        check_scales_match(run.plan, found, str(scales_in))
        _refuse_gptq_scales(found, str(scales_in))
        if header.get("model_sha256") != run.loaded.sha256:
            log.warning(
                "%s was calibrated on another model file than %s", scales_in, run.loaded.path
            )
        return found
    plan = calibrated_part(run.plan)
    hessians = hessian_inputs(plan)
    if run.source is None and gptq_weights(plan):
        raise DataError(
            "weight method gptq needs data (the inputs of the layers it rounds): pass --data"
        )
    if run.source is None and (plan.activations or hessians):
        raise DataError("calibration needs data: pass --data (or scales_in to reuse saved scales)")
    found: dict[str, TensorScales] = runtime_scale_records(run.plan)
    capture = _capture_pass(run, plan, config.data.max_batches, progress)
    activations = calibrate_activations(
        plan,
        capture,
        run.recipe.nonfinite,
        state=run.state,
        resume=config.state.resume,
        ranks=run.ranks,
        detail=config.outputs.report is not None or config.outputs.html is not None,
    )
    del capture  # closes the capture session (its copies of the weights) before the weights
    run.batches_per_pass = [*run.batches_per_pass, *activations.batches_per_pass]
    device = weight_device(run)
    found.update(
        calibrate_weights(
            run.loaded.proto, plan, run.recipe.nonfinite, activations.hessians, device
        )
    )
    found.update(
        compensate_weights(
            run.loaded.proto, plan, run.recipe.nonfinite, activations.full_hessians, device
        )
    )
    found.update(activations.scales)
    run.candidates = activations.candidates
    run.activation_detail = activations.detail
    return found


def _refuse_gptq_scales(found: dict[str, TensorScales], where: str) -> None:
    """RecipeError for saved GPTQ weight scales: they fit GPTQ's rounded weights, which the
    scales file does not hold."""
    gptq = sorted(
        s.name for s in found.values() if s.method in METHODS and METHODS[s.method].full_hessian
    )
    if gptq:
        raise RecipeError(
            f"{where}: weight {gptq[0]!r} was calibrated with gptq, whose rounded weights the "
            "scales file does not hold: calibrate again with --data instead of --scales-in"
        )


def weight_device(run: Run) -> torch.device | None:
    """Where weights are calibrated: the GPU the run captures on (CUDA EP first, and a torch
    with CUDA), so that their sweeps run in its kernels; else the host (None)."""
    cuda = run.providers[:1] == ["CUDAExecutionProvider"]
    return torch.device("cuda", run.device_id) if cuda and torch.cuda.is_available() else None


def _capture_pass(run: Run, plan: Plan, max_batches: int | None, progress: ProgressFactory | None):
    """A CapturePass over the run's data with one ORT session, opened on first use, exposing
    ``plan``'s activations and Hessian inputs."""
    sessions: list[OrtCapture] = []

    def capture(
        collectors: dict[str, list[Collector]],
        label: str,
        *,
        skip: int = 0,
        after_batch: Callable[[int], None] | None = None,
    ) -> int:
        if not sessions:
            types = tensor_types(run.loaded.proto)
            wanted = {t: types[t] for t in [*plan.activations, *hessian_inputs(plan)]}
            sessions.append(
                OrtCapture(
                    run.loaded.proto,
                    wanted,
                    providers=run.providers,
                    name=str(run.loaded.path),
                    device_id=run.device_id,
                    sink_workers=host_workers(run.ranks.world),
                )
            )

        def sink(tensor: str, value: torch.Tensor) -> None:
            for collect in collectors[tensor]:
                collect(value)

        with progress(f"calibrating ({label})") if progress else nullcontext() as on_batch:
            return sessions[0].run(
                run.source,
                sink,
                tensors=list(collectors),
                max_batches=max_batches,
                on_batch=on_batch,
                skip=skip,
                after_batch=after_batch,
                allow_empty=run.ranks.world > 1,
            )

    return capture
