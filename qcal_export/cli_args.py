"""The ``qcal`` command's arguments: one parser per command, and argparse's errors as the one
``qcal: error:`` line every qcal error is. The commands that run them are cli.py's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from rich.console import Console

from qcal_export.errors import RecipeError
from qcal_export.spec.choices import (
    CheckpointLayout,
    NonFinite,
    NVFP4Form,
    Target,
    TensorKind,
    WeightsMode,
)
from qcal_export.spec.formats import FORMATS
from qcal_export.spec.methods import method_names
from qcal_export.spec.recipe import DEFAULT_TARGET

console = Console(stderr=True)


class Parser(argparse.ArgumentParser):
    """argparse with its errors as the one line every qcal error is: ``qcal: error: ...``, the
    command's help named in it, and exit status 2 (argparse's own)."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{message} (see `{self.prog} --help`)")
        sys.exit(2)


def print_error(message: str) -> None:
    """``qcal: error: message`` on one line (a message's own line breaks become spaces)."""
    line = " ".join(message.split())
    console.print(f"qcal: error: {line}", markup=False, highlight=False, soft_wrap=True)


def count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}")
        return value

    return parse


def add_calibrate(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``calibrate`` command's parser; cli.build_parser sets the command it runs."""
    p = sub.add_parser(
        "calibrate", help="calibrate an ONNX model and write its QDQ form and scales"
    )
    p.add_argument("model", help="float ONNX model (never modified)")
    add_data_args(p)
    p.add_argument("-o", "--output", help="QDQ ONNX model to write")
    p.add_argument("--scales", help="safetensors scales file to write")
    p.add_argument("--report", help="JSON report to write")
    add_quantization_args(p)
    p.add_argument("--checkpoint", help="directory for NVFP4 serving checkpoints")
    p.add_argument(
        "--checkpoint-layout",
        nargs="+",
        default=["modelopt"],
        choices=CheckpointLayout.values(),
        help="serving layouts; several go to DIR/<layout>",
    )
    p.add_argument(
        "--exclude", nargs="*", default=[], metavar="NODE", help="node name patterns left in float"
    )
    p.add_argument("--exclude-op-types", nargs="*", default=[], metavar="OP")
    p.add_argument("--recipe", help="YAML/JSON recipe (overrides --format/--method/--exclude)")
    p.add_argument("--weights-mode", default="quantized", choices=WeightsMode.values())
    p.add_argument("--nonfinite", default="skip", choices=NonFinite.values())
    p.add_argument("--batches", type=int, help="use at most N batches")
    p.add_argument(
        "--batch-size",
        type=int,
        help="samples per batch: splits a single .npz along axis 0; images and texts: default 8",
    )
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--device-id", type=int, default=0, help="GPU the CUDA EP captures on (tensors stay there)"
    )
    p.add_argument("--scales-in", help="re-export from a saved scales file, no calibration")
    p.add_argument("--validate-batches", type=int, default=4, help="batches for the error check")
    p.add_argument(
        "--validate-data",
        metavar="PATH",
        help="validate on this data (read as --data) instead of every --holdout-every-th batch "
        "of --data, held out from calibration",
    )
    p.add_argument(
        "--min-cosine",
        type=float,
        default=0.99,
        metavar="C",
        help="the verdict's threshold: every output's cosine to the float model's (default 0.99)",
    )
    p.add_argument(
        "--eval-module",
        metavar="FILE.py:FUNCTION",
        help="a task metric metric(float_outputs, quantized_outputs) -> number or dict, averaged "
        "over the validation batches by batch size and shown beside the cosine",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 3 when the verdict is below --min-cosine, or when ONNX Runtime's default "
        "optimizations fail on or miscompute the model (outputs and report are still written)",
    )
    p.add_argument(
        "--state", help="file where calibrator state is saved every --state-every batches"
    )
    p.add_argument("--state-every", type=int, default=100, metavar="N", help="default 100")
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its --state file"
    )
    add_layer_args(p)
    p.add_argument(
        "--nproc",
        type=count(1),
        default=1,
        metavar="N",
        help="split the batches across N processes (torch's launcher; gloo on CPU, NCCL on GPUs)",
    )
    return p


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The data and how its forms (images, texts, random) become the model's inputs."""
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--data",
        help=".npz file; directory of .npz/.npy batches, of images (.png/.jpg) or of .txt texts; "
        "a text file (one text a line, with --tokenizer); or `random` (speed only)",
    )
    source.add_argument(
        "--data-module",
        metavar="FILE.py:FUNCTION",
        help="a function returning an iterable of {input: array} feeds (or a callable per pass)",
    )
    images = p.add_argument_group("images (--data DIR of .png/.jpg)")
    images.add_argument(
        "--input-size", nargs=2, type=count(1), metavar=("H", "W"), help="default: the model's"
    )
    images.add_argument("--mean", nargs="+", type=float, help="per channel, on [0, 1] pixels")
    images.add_argument("--std", nargs="+", type=float, help="per channel, on [0, 1] pixels")
    images.add_argument("--layout", choices=["nchw", "nhwc"], help="default: from the model")
    images.add_argument("--channels", choices=["rgb", "bgr"], help="channel order (default rgb)")
    images.add_argument(
        "--resize",
        choices=["crop", "stretch"],
        help="crop (default): shorter side to fit, then centre crop; stretch: straight to H W",
    )
    texts = p.add_argument_group("texts (--data FILE or DIR of .txt)")
    texts.add_argument("--tokenizer", metavar="DIR", help="a local Hugging Face tokenizer")
    texts.add_argument(
        "--max-length", type=count(2), metavar="N", help="tokens per text (default: the model's)"
    )
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D0,D1,..",
        help="--data random: dims of an input the model leaves symbolic (repeatable)",
    )


def data_arguments(args: argparse.Namespace) -> tuple[Any, Any]:
    """The ``data`` and ``data_options`` that calibrate_onnx takes, from the data flags; a
    RecipeError where flags of two forms are mixed."""
    from qcal_export.capture.data_module import DataModule
    from qcal_export.capture.images import ImageOptions
    from qcal_export.capture.random_data import RandomOptions, parse_input_shape
    from qcal_export.capture.texts import TextOptions

    image_flags = {
        "--input-size": args.input_size,
        "--mean": args.mean,
        "--std": args.std,
        "--layout": args.layout,
        "--channels": args.channels,
        "--resize": args.resize,
    }
    text_flags = {"--tokenizer": args.tokenizer, "--max-length": args.max_length}
    forms = {
        "images": [k for k, v in image_flags.items() if v is not None],
        "texts": [k for k, v in text_flags.items() if v is not None],
        "random data": ["--input-shape"] if args.input_shape else [],
    }
    given = {form: flags for form, flags in forms.items() if flags}
    flags = [flag for form_flags in given.values() for flag in form_flags]
    if len(given) > 1:
        raise RecipeError(f"options of different data forms given together: {flags}")
    if args.data_module is not None:
        if given:
            raise RecipeError(f"--data-module makes its own feeds: drop {flags}")
        return DataModule.parse(args.data_module), None
    if args.data == "random":
        if given.keys() - {"random data"}:
            raise RecipeError(f"--data random takes --input-shape only, not {flags}")
        shapes = dict(parse_input_shape(text) for text in args.input_shape)
        return args.data, RandomOptions(shapes, batches=args.batches or 8)
    if "random data" in given:
        raise RecipeError("--input-shape applies to --data random only")
    if "texts" in given and args.tokenizer is None:
        raise RecipeError("--max-length applies to texts: pass --tokenizer DIR too")
    if "images" in given:
        chosen = {k[2:].replace("-", "_"): v for k, v in image_flags.items() if v is not None}
        for key in ("mean", "std", "input_size"):
            if key in chosen:
                chosen[key] = tuple(chosen[key])
        return args.data, ImageOptions(**chosen)
    if "texts" in given:
        return args.data, TextOptions(args.tokenizer, args.max_length)
    return args.data, None


def add_layer_args(p: argparse.ArgumentParser) -> None:
    """The per-layer view and the precision search."""
    p.add_argument(
        "--layer-view",
        action="store_true",
        help="report each quantized node's SQNR and its output error when quantized alone",
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--target-cosine",
        type=float,
        metavar="C",
        help="leave the fewest nodes in float so that held-out batches reach this mean cosine",
    )
    target.add_argument(
        "--target-rel-l2", type=float, metavar="E", help="the same for a relative L2 error"
    )
    p.add_argument(
        "--holdout-every",
        type=int,
        default=5,
        metavar="N",
        help="every Nth batch is held out from calibration, for validation and targets "
        "(default 5; with fewer batches, validation uses the calibration batches)",
    )
    p.add_argument(
        "--view-batches", type=int, default=4, metavar="N", help="batches of the view (default 4)"
    )
    p.add_argument(
        "--smooth",
        type=float,
        metavar="ALPHA",
        help="migrate activation outliers into the weights first (SmoothQuant alpha, e.g. 0.5)",
    )


def add_quantization_args(p: argparse.ArgumentParser) -> None:
    """Formats, methods and their options, block sizes: what builds the recipe."""
    formats = list(FORMATS)
    p.add_argument(
        "--format",
        default="int8",
        choices=formats,
        help="weights and activations (int4/uint4: weights only, activations stay float)",
    )
    p.add_argument("--weight-format", choices=formats, help="weights' format (default --format)")
    p.add_argument(
        "--activation-format", choices=[*formats, "none"], help="activations' format, or none"
    )
    p.add_argument(
        "--method",
        default="max",
        choices=method_names(),
        help="activation method; nvfp4-mse is a weight method (activations then use max)",
    )
    p.add_argument(
        "--weight-method",
        choices=method_names(),
        help="weight method (default max, or nvfp4-mse when --method nvfp4-mse)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        help="weight blocks along the reduction axis (int4 default 128; nvfp4 is always 16)",
    )
    p.add_argument(
        "--hessian",
        action="store_true",
        help="nvfp4-mse: weight the error by each layer's input X^T X (needs --data)",
    )
    p.add_argument(
        "--nvfp4-form",
        default="portable",
        choices=NVFP4Form.values(),
        help="NVFP4 activations as standard ops, or Model Optimizer's trt::TRT_FP4DynamicQuantize",
    )
    p.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        choices=Target.values(),
        help="Q/DQ placement of this runtime: ort (ONNX Runtime's integer kernels: Add, Mul, "
        "Concat, pooling, Softmax..., scales shared through data movement) or tensorrt "
        f"(TensorRT's rules: compute-op inputs, residual Adds, pooling inputs); default "
        f"{DEFAULT_TARGET}",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        type=method_option,
        metavar="KEY=VALUE",
        help="a method option, e.g. percentile=99.99, bins=4096, grid=200 (repeatable)",
    )
    p.add_argument(
        "--per-channel-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one weight scale per output channel (default) or per tensor",
    )


def method_option(text: str) -> tuple[str, float]:
    """``KEY=VALUE`` with a number value (an int where it has no fraction)."""
    key, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or not key or number is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=NUMBER (e.g. percentile=99.99)")
    return key, int(number) if number.is_integer() and "." not in value else number


def add_inspect(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``inspect`` command's parser; cli.build_parser sets the command it runs."""
    p = sub.add_parser("inspect", help="list the quantizable nodes of an ONNX model")
    p.add_argument("model")
    p.add_argument(
        "--op-types", nargs="*", help="op types to list (default MatMul Gemm Conv ConvTranspose)"
    )
    return p


def add_demo(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``demo`` command's parser; cli.build_parser sets the command it runs."""
    p = sub.add_parser(
        "demo", help="calibrate all-MiniLM-L6-v2 on stdlib docstrings; int8, fp8, nvfp4"
    )
    p.add_argument("--out-dir", default="qcal-demo", help="where the demo writes its models")
    p.add_argument("--cache-dir", help="where the exported float model is cached")
    p.add_argument(
        "--formats",
        nargs="*",
        default=["int8", "fp8", "nvfp4"],
        choices=[name for name, fmt in FORMATS.items() if not fmt.weight_only],
    )
    p.add_argument(
        "--methods",
        nargs="*",
        default=["max"],
        choices=method_names(TensorKind.ACTIVATION),
        help="activations",
    )
    p.add_argument(
        "--weight-methods",
        nargs="*",
        default=["max", "mse", "nvfp4-mse"],
        choices=method_names(),
        help="weights (nvfp4-mse: nvfp4 only)",
    )
    return p
