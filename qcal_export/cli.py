"""The ``qcal`` command: calibrate, inspect, demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qcal_export.errors import QcalError
from qcal_export.recipe import METHODS

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


def progress_bar(total: int | None) -> Callable[[str], object]:
    """A progress factory for the pipeline: one rich bar per pass over the batches."""

    @contextmanager
    def bar(label: str) -> Iterator[Callable[[], None]]:
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        ]
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(label, total=total)
            try:
                yield lambda: progress.advance(task)
            except BaseException:
                progress.live.transient = True  # a failed pass leaves the error line alone
                raise

    return bar


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="calibrate an ONNX model and write its QDQ form and scales"
    )
    p.add_argument("model", help="float ONNX model (never modified)")
    p.add_argument("--data", help=".npz file, or directory of .npz/.npy batches")
    p.add_argument("-o", "--output", help="QDQ ONNX model to write")
    p.add_argument("--scales", help="safetensors scales file to write")
    p.add_argument("--report", help="JSON report to write")
    add_quantization_args(p)
    p.add_argument("--checkpoint", help="directory for NVFP4 serving checkpoints")
    p.add_argument(
        "--checkpoint-layout",
        nargs="+",
        default=["modelopt"],
        choices=["modelopt", "compressed-tensors"],
        help="serving layouts; several go to DIR/<layout>",
    )
    p.add_argument(
        "--exclude", nargs="*", default=[], metavar="NODE", help="node name patterns left in float"
    )
    p.add_argument("--exclude-op-types", nargs="*", default=[], metavar="OP")
    p.add_argument("--recipe", help="YAML/JSON recipe (overrides --format/--method/--exclude)")
    p.add_argument("--weights-mode", default="quantized", choices=["quantized", "qdq"])
    p.add_argument("--nonfinite", default="skip", choices=["skip", "error"])
    p.add_argument("--batches", type=int, help="use at most N batches")
    p.add_argument("--batch-size", type=int, help="split a single .npz along axis 0")
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--device-id", type=int, default=0, help="GPU the CUDA EP captures on (tensors stay there)"
    )
    p.add_argument("--scales-in", help="re-export from a saved scales file, no calibration")
    p.add_argument("--validate-batches", type=int, default=4, help="batches for the error check")
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 3 when ONNX Runtime's default optimizations fail on or miscompute the model "
        "(outputs and report are still written)",
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
    p.set_defaults(run=cmd_calibrate)


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
        help="with a target, every Nth batch is held out from calibration (default 5)",
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
    formats = ["int8", "uint8", "int4", "uint4", "fp8", "nvfp4"]
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
        choices=METHODS,
        help="activation method; nvfp4-mse is a weight method (activations then use max)",
    )
    p.add_argument(
        "--weight-method",
        choices=METHODS,
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
        choices=["portable", "tensorrt"],
        help="NVFP4 activations as standard ops, or Model Optimizer's trt::TRT_FP4DynamicQuantize",
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


def cmd_calibrate(args: argparse.Namespace) -> None:
    from qcal_export.pipeline import calibrate_onnx
    from qcal_export.summary import print_layers, print_summary

    result = calibrate_onnx(
        args.model,
        args.data,
        output=args.output,
        scales=args.scales,
        report=args.report,
        recipe=args.recipe,
        format=args.format,
        method=args.method,
        weight_method=args.weight_method,
        weight_format=args.weight_format,
        activation_format=args.activation_format,
        block_size=args.block_size,
        hessian=args.hessian,
        nvfp4_form=args.nvfp4_form,
        method_options=dict(args.option),
        checkpoint=args.checkpoint,
        checkpoint_layouts=tuple(args.checkpoint_layout),
        per_channel_weights=args.per_channel_weights,
        exclude=tuple(args.exclude),
        exclude_op_types=tuple(args.exclude_op_types),
        weights_mode=args.weights_mode,
        nonfinite=args.nonfinite,
        batch_size=args.batch_size,
        max_batches=args.batches,
        provider=args.provider,
        device_id=args.device_id,
        scales_in=args.scales_in,
        validate_batches=args.validate_batches,
        strict=args.strict,
        state=args.state,
        state_every=args.state_every,
        resume=args.resume,
        layer_view=args.layer_view,
        target_cosine=args.target_cosine,
        target_rel_l2=args.target_rel_l2,
        holdout_every=args.holdout_every,
        view_batches=args.view_batches,
        smooth=args.smooth,
        progress=progress_bar(args.batches),
    )
    if os.environ.get("RANK", "0") == "0":  # one summary for a distributed run
        print_summary(result.report)
        print_layers(result.report)


def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list the quantizable nodes of an ONNX model")
    p.add_argument("model")
    p.add_argument(
        "--op-types", nargs="*", help="op types to list (default MatMul Gemm Conv ConvTranspose)"
    )
    p.set_defaults(run=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> None:
    from qcal_export.graphs.inspect import quantizable_nodes
    from qcal_export.graphs.model_io import load_model

    loaded = load_model(args.model)
    rows = quantizable_nodes(loaded.proto, args.op_types)
    table = Table(title=f"{args.model}: opset {loaded.opset}, {len(rows)} quantizable nodes")
    for column in ("node", "op", "activations", "weight", "weight axis"):
        table.add_column(column, overflow="fold")
    for row in rows:
        cells = (row.node, row.op_type, "\n".join(row.activations), row.weight or "", row.axis)
        table.add_row(*map(escape, cells))
    Console().print(table)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="calibrate all-MiniLM-L6-v2 on stdlib docstrings; int8, fp8, nvfp4"
    )
    p.add_argument("--out-dir", default="qcal-demo", help="where the demo writes its models")
    p.add_argument("--cache-dir", help="where the exported float model is cached")
    p.add_argument(
        "--formats",
        nargs="*",
        default=["int8", "fp8", "nvfp4"],
        choices=["int8", "uint8", "fp8", "nvfp4"],
    )
    p.add_argument(
        "--methods",
        nargs="*",
        default=["max"],
        choices=[m for m in METHODS if m != "nvfp4-mse"],
        help="activations",
    )
    p.add_argument(
        "--weight-methods",
        nargs="*",
        default=["max", "mse", "nvfp4-mse"],
        choices=METHODS,
        help="weights (nvfp4-mse: nvfp4 only)",
    )
    p.set_defaults(run=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    from qcal_export.demo import run_demo

    rows = run_demo(
        Path(args.out_dir),
        args.formats,
        args.methods,
        args.weight_methods,
        cache_dir=args.cache_dir,
        progress=progress_bar(None),
    )
    title = (
        "all-MiniLM-L6-v2 static quantization: sentence-embedding cosine vs float, held-out text"
    )
    table = Table(title=title)
    columns = ("format", "activations", "weights", "weight rel err", "mean cosine", "min cosine")
    for column in (*columns, "calibration s", "model"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["format"],
            r["method"],
            r["weight_method"],
            f"{r['weight_error']:.4f}",
            f"{r['mean']:.4f}",
            f"{r['min']:.4f}",
            f"{r['seconds']:.1f}",
            r["model"],
        )
    Console().print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qcal", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    add_calibrate(sub)
    add_inspect(sub)
    add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or Parser.error's one line (2)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="qcal: %(message)s",
    )
    if getattr(args, "nproc", 1) > 1 and "WORLD_SIZE" not in os.environ:
        return launch(argv, args.nproc)
    try:
        args.run(args)
    except QcalError as e:
        print_error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        console.print("qcal: interrupted")
        return 130
    finally:
        _leave_process_group()
    return 0


def launch(argv: list[str], nproc: int) -> int:
    """``argv`` again under torch's launcher (``torchrun --standalone``) in ``nproc``
    processes; the exit status is the worst of theirs."""
    from torch.distributed.run import get_args_parser, run

    child = [a for i, a in enumerate(argv) if a != "--nproc" and argv[i - 1 : i] != ["--nproc"]]
    child = [a for a in child if not a.startswith("--nproc=")]
    launcher = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "-m", "qcal_export.cli", *child]
    )
    try:
        run(launcher)
    except Exception as error:  # torch's ChildFailedError: each rank printed its own error
        console.print(f"qcal: {nproc} processes: {type(error).__name__}", markup=False)
        return 2
    return 0


def _leave_process_group() -> None:
    """End the process group a distributed run started (torch loaded it, if any)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
