"""The ``qcal`` command: calibrate, inspect, demo, report."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qcal_export.cli_args import (
    Parser,
    add_calibrate,
    add_demo,
    add_inspect,
    add_report,
    config_from_args,
    console,
    data_arguments,
    inspect_recipe,
    print_error,
)
from qcal_export.cli_args import method_option as method_option
from qcal_export.errors import QcalError

if TYPE_CHECKING:
    import onnx

    from qcal_export.graphs.inspect_placement import PlacementView


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


def cmd_calibrate(args: argparse.Namespace) -> None:
    from qcal_export.artifacts.summary import print_layers, print_summary, print_verdict
    from qcal_export.pipeline.calibrate import calibrate_onnx

    data, data_options = data_arguments(args)
    result = calibrate_onnx(
        args.model,
        data,
        config_from_args(args),
        data_options=data_options,
        progress=progress_bar(args.max_batches),
    )
    if os.environ.get("RANK", "0") == "0":  # one summary for a distributed run
        print_summary(result.report)
        print_layers(result.report)
        for what, path in (("report", result.report_path), ("HTML report", result.html_path)):
            if path is not None:
                Console().print(f"wrote the {what} {path}", markup=False, soft_wrap=True)
        print_verdict(result.report)


def cmd_inspect(args: argparse.Namespace) -> None:
    from qcal_export.graphs.inspect import quantizable_nodes
    from qcal_export.graphs.inspect_placement import placement_view
    from qcal_export.graphs.preprocess import preprocess
    from qcal_export.onnx_io.model_io import load_model
    from qcal_export.spec.recipe_options import recipe_notes

    recipe = inspect_recipe(args)
    loaded = load_model(args.model)
    preprocessed = preprocess(loaded.proto)
    rows = quantizable_nodes(preprocessed.model, recipe=recipe)
    view = placement_view(preprocessed.model, recipe)
    out = Console()
    out.print(input_table(loaded.proto, args.model))
    for change in preprocessed.changes:
        out.print(f"pre-processing: {escape(change)}", soft_wrap=True)
    for why in preprocessed.unfound_weights.values():
        out.print(f"warning: {escape(why)}", soft_wrap=True)
    table = Table(title=f"{args.model}: opset {loaded.opset}, {len(rows)} quantizable nodes")
    for column in ("node", "op", "activations", "weight", "weight axis"):
        table.add_column(column, overflow="fold")
    for row in rows:
        cells = (row.node, row.op_type, "\n".join(row.activations), row.weight or "", row.axis)
        table.add_row(*map(escape, cells))
    out.print(table)
    chosen = {"format": args.format, "activation_format": args.activation_format}
    for note in [] if args.recipe else recipe_notes(None, {**chosen, "target": args.target}):
        out.print(f"note: {escape(note)}", soft_wrap=True)
    print_placement(out, view, args.placement)


def print_placement(out: Console, view: PlacementView, details: bool) -> None:
    """The placement a calibrate run with these options would use: a count line, and the
    details per node and tensor for a small plan or with ``details`` (``--placement``)."""
    from qcal_export.cli_args import PLACEMENT_DETAIL_NODES

    out.print(escape(view.count_line()), soft_wrap=True)
    if details or len(view.plan.nodes) <= PLACEMENT_DETAIL_NODES:
        for line in view.lines():
            out.print(escape(line), soft_wrap=True, highlight=False)
    else:
        out.print("the placement per node and per tensor: pass --placement", soft_wrap=True)


def input_table(model: onnx.ModelProto, name: str) -> Table:
    """The model's inputs to feed: name, dtype and shape (``?`` where symbolic)."""
    from qcal_export.capture.data import model_inputs

    table = Table(title=f"{name}: inputs")
    for column in ("input", "dtype", "shape"):
        table.add_column(column, overflow="fold")
    for spec in model_inputs(model, name):
        optional = " (optional)" if spec.optional else ""
        table.add_row(escape(spec.name + optional), str(spec.dtype), f"[{spec.shape_text()}]")
    return table


def cmd_demo(args: argparse.Namespace) -> None:
    from qcal_export.demo import run_demo

    rows = run_demo(
        Path(args.out_dir),
        args.formats,
        args.methods,
        args.weight_methods,
        activation_format=args.activation_format,
        mixed_formats=args.mixed_formats,
        target_cosine=args.target_cosine,
        cache_dir=args.cache_dir,
        progress=progress_bar(None),
    )
    print_demo(rows, Path(args.out_dir))


def print_demo(rows: list[dict], out_dir: Path) -> None:
    """The demo's rows in 80 columns (labels fold, numbers stay whole), then where its models
    and HTML reports are."""
    from qcal_export.artifacts.summary import compact_table, print_table

    title = "all-MiniLM-L6-v2: sentence-embedding cosine vs float on held-out text"
    columns = ["format", "act.", "weights", "w rel err", "mean cos", "min cos", "time s"]
    table = compact_table(columns, numbers=4)
    for r in rows:
        activations = r["activation_format"]
        if activations == "none":
            label = f"{r['format']} (weights only)"
        elif activations == "mixed":
            label = f"{r['format']}: {r['bits_per_weight']:.2f} bits/weight"
        elif activations != r["format"]:
            label = f"{r['format']} ({activations} act.)"
        else:
            label = r["format"]
        table.add_row(
            label,
            r["method"],
            r["weight_method"],
            f"{r['weight_error']:.4f}",
            f"{r['mean']:.4f}",
            f"{r['min']:.4f}",
            f"{r['seconds']:.1f}",
        )
    out = Console()
    print_table(out, title, table)
    out.print(f"models, JSON and HTML reports in {out_dir}; open a report in a browser:")
    for r in rows:
        out.print(f"  {r['html']}", soft_wrap=True, highlight=False)


def cmd_report(args: argparse.Namespace) -> None:
    from qcal_export.artifacts.html_report import load_report, write_html
    from qcal_export.errors import OutputError
    from qcal_export.files.paths import Place, check_outputs

    check_outputs({"-o": args.output})
    if Place("", Path(args.output)).same(Place("", Path(args.report))):
        raise OutputError(f"-o {args.output} is the report read (REPORT): give another path")
    written = write_html(args.output, load_report(args.report))
    Console().print(f"wrote {written}", markup=False, soft_wrap=True)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qcal", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    add_calibrate(sub).set_defaults(run=cmd_calibrate)
    add_inspect(sub).set_defaults(run=cmd_inspect)
    add_demo(sub).set_defaults(run=cmd_demo)
    add_report(sub).set_defaults(run=cmd_report)
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
