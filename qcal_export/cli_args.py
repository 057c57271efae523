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
from qcal_export.spec.choices import Target, TensorKind
from qcal_export.spec.config import CalibrationConfig, option_fields
from qcal_export.spec.config_groups import FORMATS
from qcal_export.spec.formats import FORMATS as FORMAT_REGISTRY
from qcal_export.spec.methods import method_names
from qcal_export.spec.recipe import Recipe

console = Console(stderr=True)
PLACEMENT_DETAIL_NODES = 40
"""``qcal inspect`` prints the placement's details for plans of at most this many nodes."""


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
    """The ``calibrate`` command's parser; cli.build_parser sets the command it runs. Every
    option of CalibrationConfig is one flag, made from its field's metadata (spec/config.py)."""
    p = sub.add_parser(
        "calibrate", help="calibrate an ONNX model and write its QDQ form and scales"
    )
    p.add_argument("model", help="float ONNX model (never modified)")
    add_data_args(p)
    add_config_args(p)
    p.add_argument(
        "--nproc",
        type=count(1),
        default=1,
        metavar="N",
        help="split the batches across N processes (torch's launcher; gloo on CPU, NCCL on GPUs)",
    )
    return p


def add_config_args(p: argparse.ArgumentParser) -> None:
    """One flag per config option, its dest the option's name, its default the config's."""
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for _, option in option_fields():
        words = dict(option.metadata["cli"])
        flags = words.pop("flags")
        where: Any = p
        if "exclusive" in words:
            name = words.pop("exclusive")
            where = exclusive.get(name) or exclusive.setdefault(
                name, p.add_mutually_exclusive_group()
            )
        if "type" in words:
            words["type"] = ARGUMENT_TYPES[words["type"]]
        if words.get("action") == "boolean":
            words["action"] = argparse.BooleanOptionalAction
        default = option.default
        if words.get("action") == "append":
            default = []
        elif isinstance(default, tuple):
            default = list(default)
        where.add_argument(*flags, dest=option.name, default=default, **words)


def config_from_args(args: argparse.Namespace) -> CalibrationConfig:
    """The CalibrationConfig of the parsed ``calibrate`` flags (checked as it is built)."""
    grouped: dict[str, dict[str, Any]] = {}
    for group, option in option_fields():
        value = getattr(args, option.name)
        if option.metadata["cli"].get("action") == "append":
            value = dict(value) or None
        grouped.setdefault(group, {})[option.name] = value
    return CalibrationConfig.from_dict(grouped)


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
        return args.data, RandomOptions(shapes, batches=args.max_batches or 8)
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


def inspect_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe a calibrate run with inspect's options would build (``--recipe`` first)."""
    import dataclasses

    from qcal_export.spec.recipe import load_recipe
    from qcal_export.spec.recipe_options import build_recipe

    recipe = build_recipe(
        load_recipe(args.recipe) if args.recipe else None,
        format=args.format,
        weight_format=args.weight_format,
        activation_format=args.activation_format,
        exclude=tuple(args.exclude),
        exclude_op_types=tuple(args.exclude_op_types),
        target=args.target,
    )
    if args.op_types:
        recipe = dataclasses.replace(recipe, op_types=tuple(args.op_types))
    return recipe


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


ARGUMENT_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "method_option": method_option,
    "format_list": lambda text: [part.strip() for part in text.split(",")],
}
"""The argparse types config fields name in their metadata."""


def add_inspect(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``inspect`` command's parser; cli.build_parser sets the command it runs."""
    p = sub.add_parser(
        "inspect", help="list the quantizable nodes of an ONNX model and the Q/DQ placement"
    )
    p.add_argument("model")
    p.add_argument("--op-types", nargs="*", help="op types to plan (default: calibrate's)")
    p.add_argument("--format", default="int8", choices=FORMATS, help="as for calibrate")
    p.add_argument("--weight-format", choices=FORMATS)
    p.add_argument("--activation-format", choices=[*FORMATS, "none"])
    p.add_argument(
        "--target",
        choices=Target.values(),
        help="the Q/DQ placement to show, as calibrate --target (default: calibrate's)",
    )
    p.add_argument("--exclude", nargs="*", default=[], metavar="NODE")
    p.add_argument("--exclude-op-types", nargs="*", default=[], metavar="OP")
    p.add_argument("--recipe", help="YAML/JSON recipe (overrides the options above)")
    p.add_argument(
        "--placement",
        action="store_true",
        help="print the placement per node and per tensor even for a large model "
        f"(default: only up to {PLACEMENT_DETAIL_NODES} quantized nodes)",
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
        choices=list(FORMAT_REGISTRY),
        help="formats of the rows (weight-only ones: int4, or any with --activation-format none)",
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
    p.add_argument(
        "--activation-format",
        choices=[*(n for n, fmt in FORMAT_REGISTRY.items() if not fmt.weight_only), "none"],
        help="every row's activations (int16 with --formats int8: A16W8; none: weight-only)",
    )
    p.add_argument(
        "--mixed-formats",
        nargs="*",
        default=[],
        choices=list(FORMAT_REGISTRY),
        help="one more row: each node gets the cheapest of these formats (cheapest first) that "
        "keeps --target-cosine on held-out batches",
    )
    p.add_argument(
        "--target-cosine",
        type=float,
        default=0.99,
        help="the mixed-format row's target (default 0.99)",
    )
    return p


def add_report(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``report`` command's parser: a saved JSON report as one HTML page."""
    p = sub.add_parser("report", help="render a saved JSON report (--report) as one HTML page")
    p.add_argument("report", help="JSON report a calibrate run wrote (--report)")
    p.add_argument("-o", "--output", required=True, help="HTML file to write")
    return p
