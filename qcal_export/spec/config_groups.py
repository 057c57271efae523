"""The groups of a calibration's options (``CalibrationConfig``, config.py), each a frozen
dataclass checked when built. A field's ``metadata["cli"]`` holds its ``qcal calibrate`` flag
and argparse's words for it, from which cli_args builds the parser.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcal_export.errors import RecipeError
from qcal_export.spec.checks import (
    MIN_COSINE,
    check_count,
    check_min_cosine,
    check_state_every,
)
from qcal_export.spec.choices import (
    CalibTableForm,
    CheckpointLayout,
    Int4Layout,
    NonFinite,
    NVFP4Form,
    Target,
    WeightsMode,
)
from qcal_export.spec.formats import FORMATS as FORMAT_REGISTRY
from qcal_export.spec.methods import METHODS
from qcal_export.spec.recipe import DEFAULT_TARGET, Recipe, load_recipe
from qcal_export.spec.recipe_options import build_recipe, recipe_notes
from qcal_export.spec.trt_version import DEFAULT_TRT_VERSION, trt_version_number

FORMATS = tuple(FORMAT_REGISTRY)
METHOD_NAMES = tuple(METHODS)


def cli(*flags: str, **words: Any) -> dict[str, Any]:
    """A field's metadata: its CLI flag(s) and argparse's words for it (help, choices, metavar,
    nargs; ``action`` store_true, append or boolean; ``type`` int, float or method_option;
    ``exclusive``: the mutually exclusive group it belongs to)."""
    return {"cli": {"flags": flags, **words}}


@dataclass(frozen=True)
class QuantizationOptions:
    """What builds the recipe: a Recipe (or a YAML/JSON recipe file) as given, else one built
    from the options (``recipe_options.build_recipe``); ``scales_in``: saved scales instead of
    calibrating."""

    recipe: Recipe | str | Path | None = field(
        default=None,
        metadata=cli("--recipe", help="YAML/JSON recipe (overrides --format/--method/--exclude)"),
    )
    format: str = field(
        default="int8",
        metadata=cli(
            "--format",
            choices=FORMATS,
            help="weights and activations (int4/uint4: weights only, activations stay float)",
        ),
    )
    weight_format: str | None = field(
        default=None,
        metadata=cli("--weight-format", choices=FORMATS, help="weights' format (default --format)"),
    )
    activation_format: str | None = field(
        default=None,
        metadata=cli(
            "--activation-format",
            choices=(*FORMATS, "none"),
            help="activations' format, or none (int16/uint16 with int8 weights: A16W8)",
        ),
    )
    method: str = field(
        default="max",
        metadata=cli(
            "--method",
            choices=METHOD_NAMES,
            help="activation method; nvfp4-mse is a weight method (activations then use max)",
        ),
    )
    weight_method: str | None = field(
        default=None,
        metadata=cli(
            "--weight-method",
            choices=METHOD_NAMES,
            help="weight method (default max, or nvfp4-mse when --method nvfp4-mse); awq: "
            "activation-aware input-channel scales searched on --data, folded into the model "
            "(int4/uint4/int8; --option clip=1, grid=N, rows=N)",
        ),
    )
    block_size: int | None = field(
        default=None,
        metadata=cli(
            "--block-size",
            type="int",
            help="weight blocks along the reduction axis (int4 default 128; nvfp4 is always 16)",
        ),
    )
    hessian: bool = field(
        default=False,
        metadata=cli(
            "--hessian",
            action="store_true",
            help="nvfp4-mse: weight the error by each layer's input X^T X (needs --data)",
        ),
    )
    nvfp4_form: str = field(
        default="portable",
        metadata=cli(
            "--nvfp4-form",
            choices=tuple(NVFP4Form.values()),
            help="NVFP4 activations as standard ops, or Model Optimizer's "
            "trt::TRT_FP4DynamicQuantize",
        ),
    )
    target: str | None = field(
        default=None,
        metadata=cli(
            "--target",
            choices=tuple(Target.values()),
            help="Q/DQ placement of this runtime: ort (ONNX Runtime's integer kernels: Add, Mul, "
            "Concat, pooling, Softmax..., scales shared through data movement) or tensorrt "
            "(TensorRT's rules: compute-op inputs, residual Adds, pooling inputs); default "
            f"{DEFAULT_TARGET} for integer activations, tensorrt for fp8 and nvfp4 ones",
        ),
    )
    method_options: Mapping[str, float] | None = field(
        default=None,
        metadata=cli(
            "--option",
            action="append",
            type="method_option",
            metavar="KEY=VALUE",
            help="a method option, e.g. percentile=99.99, bins=4096, grid=200 (repeatable)",
        ),
    )
    per_channel_weights: bool = field(
        default=True,
        metadata=cli(
            "--per-channel-weights",
            action="boolean",
            help="one weight scale per output channel (default) or per tensor",
        ),
    )
    exclude: tuple[str, ...] = field(
        default=(),
        metadata=cli(
            "--exclude", nargs="*", metavar="NODE", help="node name patterns left in float"
        ),
    )
    exclude_op_types: tuple[str, ...] = field(
        default=(), metadata=cli("--exclude-op-types", nargs="*", metavar="OP")
    )
    weights_mode: str = field(
        default="quantized", metadata=cli("--weights-mode", choices=tuple(WeightsMode.values()))
    )
    nonfinite: str = field(
        default="skip", metadata=cli("--nonfinite", choices=tuple(NonFinite.values()))
    )
    scales_in: str | Path | None = field(
        default=None,
        metadata=cli("--scales-in", help="re-export from a saved scales file, no calibration"),
    )

    def __post_init__(self) -> None:
        if self.recipe is not None and not isinstance(self.recipe, (Recipe, str, Path)):
            raise RecipeError(f"recipe must be a Recipe or a recipe file, not {self.recipe!r}")
        if self.recipe is None:
            build_recipe(None, **self.recipe_options())

    def recipe_options(self) -> dict[str, Any]:
        """The keyword options of ``build_recipe``."""
        skip = ("recipe", "scales_in")
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }

    def build(self) -> Recipe:
        """The Recipe: as given, read from the recipe file, or built from the options."""
        if isinstance(self.recipe, (str, Path)):
            return load_recipe(self.recipe)
        return build_recipe(self.recipe, **self.recipe_options())

    def notes(self) -> list[str]:
        """What building the recipe chose that the options did not say (``recipe_notes``)."""
        return recipe_notes(self.recipe, self.recipe_options())

    @property
    def recipe_file(self) -> str | Path | None:
        """The recipe file read (None: a Recipe or options), which no output may overwrite."""
        return self.recipe if isinstance(self.recipe, (str, Path)) else None


@dataclass(frozen=True)
class DataConfig:
    """How the data is batched: samples per batch, and how many batches calibrate."""

    batch_size: int | None = field(
        default=None,
        metadata=cli(
            "--batch-size",
            type="int",
            help="samples per batch: splits a single .npz along axis 0; images and texts: "
            "default 8",
        ),
    )
    max_batches: int | None = field(
        default=None,
        metadata=cli("--batches", type="int", metavar="N", help="use at most N batches"),
    )

    def __post_init__(self) -> None:
        check_count("max_batches (--batches)", self.max_batches, 1, optional=True)
        check_count("batch_size (--batch-size)", self.batch_size, 1, optional=True)


@dataclass(frozen=True)
class CaptureConfig:
    """Where activations are captured: ONNX Runtime's provider and the GPU under CUDA."""

    provider: str = field(
        default="auto", metadata=cli("--provider", choices=("auto", "cpu", "cuda"))
    )
    device_id: int = field(
        default=0,
        metadata=cli(
            "--device-id", type="int", help="GPU the CUDA EP captures on (tensors stay there)"
        ),
    )


@dataclass(frozen=True)
class OutputConfig:
    """The files a run writes (None: not asked): QDQ model, scales, report (JSON, HTML),
    checkpoints."""

    output: str | Path | None = field(
        default=None, metadata=cli("-o", "--output", help="QDQ ONNX model to write")
    )
    scales: str | Path | None = field(
        default=None, metadata=cli("--scales", help="safetensors scales file to write")
    )
    report: str | Path | None = field(
        default=None, metadata=cli("--report", help="JSON report to write")
    )
    html: str | Path | None = field(
        default=None,
        metadata=cli("--html", help="HTML report to write (one self-contained page with plots)"),
    )
    checkpoint: str | Path | None = field(
        default=None,
        metadata=cli("--checkpoint", help="directory for NVFP4 or FP8 serving checkpoints"),
    )
    checkpoint_layouts: tuple[str, ...] = field(
        default=("modelopt",),
        metadata=cli(
            "--checkpoint-layout",
            nargs="+",
            choices=tuple(CheckpointLayout.values()),
            help="serving layouts; several go to DIR/<layout>",
        ),
    )
    int4_layout: str = field(
        default="qdq",
        metadata=cli(
            "--int4-layout",
            choices=tuple(Int4Layout.values()),
            help="int4/uint4 MatMul weights as DequantizeLinear blocks (qdq), or as ONNX "
            "Runtime's com.microsoft.MatMulNBits (2-D [K, N] weights, power-of-two blocks of "
            "16 or more; others stay qdq, with a note)",
        ),
    )
    trt_calib_table: str | Path | None = field(
        default=None,
        metadata=cli(
            "--trt-calib-table",
            metavar="FILE",
            help="write the int8 activations' ranges as a calibration table (--trt-calib-form)",
        ),
    )
    trt_calib_form: str = field(
        default="tensorrt",
        metadata=cli(
            "--trt-calib-form",
            choices=tuple(CalibTableForm.values()),
            help="TensorRT's calibration cache (TRT-<version>-EntropyCalibration2 text), or "
            "ONNX Runtime TensorRT EP's flatbuffers table or its JSON twin",
        ),
    )
    trt_calib_version: str = field(
        default=DEFAULT_TRT_VERSION,
        metadata=cli(
            "--trt-calib-version",
            metavar="X.Y.Z",
            help=f"TensorRT version in the cache's first line (default {DEFAULT_TRT_VERSION})",
        ),
    )

    def __post_init__(self) -> None:
        Int4Layout.parse(self.int4_layout, "int4_layout (--int4-layout)")
        CalibTableForm.parse(self.trt_calib_form, "trt_calib_form (--trt-calib-form)")
        trt_version_number(self.trt_calib_version)


@dataclass(frozen=True)
class ValidationConfig:
    """How the QDQ model is checked: on how many batches (of which data), against which
    cosine, with which task metric, and whether a fault found exits 3 (``strict``)."""

    validate_batches: int = field(
        default=4,
        metadata=cli("--validate-batches", type="int", help="batches for the error check"),
    )
    validate_data: Any = field(
        default=None,
        metadata=cli(
            "--validate-data",
            metavar="PATH",
            help="validate on this data (read as --data) instead of every --holdout-every-th batch "
            "of --data, held out from calibration",
        ),
    )
    min_cosine: float = field(
        default=MIN_COSINE,
        metadata=cli(
            "--min-cosine",
            type="float",
            metavar="C",
            help="the verdict's threshold: every output's cosine to the float model's "
            "(default 0.99)",
        ),
    )
    eval_module: str | None = field(
        default=None,
        metadata=cli(
            "--eval-module",
            metavar="FILE.py:FUNCTION",
            help="a task metric metric(float_outputs, quantized_outputs) -> number or dict, "
            "averaged over the validation batches by batch size and shown beside the cosine",
        ),
    )
    strict: bool = field(
        default=False,
        metadata=cli(
            "--strict",
            action="store_true",
            help="exit 3 when the verdict is below --min-cosine, or when ONNX Runtime's default "
            "optimizations fail on or miscompute the model (outputs and report are still written)",
        ),
    )

    def __post_init__(self) -> None:
        check_count("validate_batches (--validate-batches)", self.validate_batches, 0)
        check_min_cosine(self.min_cosine)


@dataclass(frozen=True)
class StateConfig:
    """The resumable state: the file, how often it is saved, and whether to continue it."""

    state: str | Path | None = field(
        default=None,
        metadata=cli(
            "--state", help="file where calibrator state is saved every --state-every batches"
        ),
    )
    state_every: int = field(
        default=100, metadata=cli("--state-every", type="int", metavar="N", help="default 100")
    )
    resume: bool = field(
        default=False,
        metadata=cli(
            "--resume",
            action="store_true",
            help="continue an interrupted run from its --state file",
        ),
    )

    def __post_init__(self) -> None:
        check_state_every(self.state_every)
        if self.resume and self.state is None:
            raise RecipeError(
                "resume needs the state file to resume from: pass state=PATH (--state)"
            )
