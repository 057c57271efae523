"""A run's report as terminal tables that fit 80 columns (long names fold, nothing is cut;
granularities and the plots are in the JSON and HTML reports): tensors, output error, notes,
what was written, and the accuracy steps (smoothing, method choice, per-layer view, precision
choice)."""

from __future__ import annotations

from collections import Counter

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def compact_table(columns: list[str], numbers: int = 0) -> Table:
    """A table with light rules and no edge padding; every column folds rather than cuts, the
    last ``numbers`` columns right-aligned and never wrapped (a number stays whole). Its title
    is a line of its own (``print_table``): a table's title wraps at the table's width."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for i, column in enumerate(columns):
        number = i >= len(columns) - numbers
        table.add_column(
            column,
            overflow="fold",
            justify="right" if number else "left",
            no_wrap=number,
            ratio=None if number or i else 1,
        )
    return table


def print_table(out: Console, title: str, table: Table) -> None:
    """``title`` on its own line(s), wrapped at the terminal's width, then ``table``."""
    out.print(escape(title), soft_wrap=True)
    out.print(table)


def print_summary(report: dict) -> None:
    """Tensors, notes and output error of a run, as tables on stdout."""
    out = Console()
    title = f"{len(report['quantized_nodes'])} nodes quantized in {report['model']}"
    columns = ["tensor", "kind", "format", "method", "amax", "w rel err"]
    tensors = compact_table(columns, numbers=2)
    for row in report["tensors"]:
        error = row.get("weight_rel_error")
        tensors.add_row(
            escape(row["tensor"]),
            "act" if row["kind"] == "activation" else row["kind"],
            row["format"],
            row["method"],
            f"{row['amax']:.4g}",
            "" if error is None else f"{error:.4f}",
        )
    print_table(out, title, tensors)
    for row in report["tensors"]:
        for note in row["notes"]:
            out.print(f"note: {escape(row['tensor'])}: {escape(note)}", soft_wrap=True)
    if report["output_error"]:
        print_output_error(out, report)
    opset = report["opset"]
    if opset["from"] != opset["to"]:
        out.print(f"opset raised from {opset['from']} to {opset['to']} for the chosen formats")
    for change in (report.get("preprocess") or {}).get("changes", []):
        out.print(f"pre-processing: {escape(change)}")
    for note in [*report.get("plan_notes", []), *report["export_notes"]]:
        out.print(f"note: {escape(note)}")
    for key in ("output_model", "scales_file", "trt_calib_table"):
        if report.get(key):
            out.print(f"wrote {report[key]}")
    for layout, path in report["checkpoints"].items():
        out.print(f"wrote the {layout} checkpoint {path}")


def print_output_error(out: Console, report: dict) -> None:
    """The output error users get, relative figures first (a max abs of 1 means little without
    the output's scale), with the reference's relative L2 beside it where ONNX Runtime ran the
    model at its default optimizations, the batches it was measured on, the runtime issue if any
    and the task metric."""
    validation = report.get("validation") or {}
    reference = validation.get("reference") if validation.get("default") is not None else None
    columns = ["output", "cosine", "rel L2", "max abs diff"]
    columns += ["rel L2, optimizations off"] if reference else []
    title = f"output error vs the float model ({report['validator']})"
    errors = compact_table(columns, numbers=len(columns) - 1)
    for name, e in report["output_error"].items():
        cells = [escape(name), f"{e['cosine']:.6f}", f"{e['rel_l2']:.4g}", f"{e['max_abs']:.4g}"]
        errors.add_row(*cells, *([f"{reference[name]['rel_l2']:.4g}"] if reference else []))
    print_table(out, title, errors)
    if validation.get("batches"):
        out.print(f"validation batches: {escape(validation['batches'])}")
    issue = validation.get("runtime_issue")
    if issue:
        culprit = issue["optimizer"] or "optimizer not found"
        out.print(f"runtime issue: ONNX Runtime {issue['kind']} ({culprit}): see the report")
    metric = report.get("metric")
    if metric:
        values = ", ".join(f"{k} {v:.4g}" for k, v in metric["values"].items())
        out.print(f"task metric ({escape(metric['function'])}): {values or 'no batch'}")


def print_verdict(report: dict) -> None:
    """The run's last line: the verdict, where the run validated its model."""
    verdict = report.get("verdict")
    if verdict:
        style = "green" if verdict["status"] == "pass" else "bold red"
        Console().print(f"[{style}]{escape(verdict['line'])}[/{style}]", soft_wrap=True)


def print_layers(report: dict) -> None:
    """Smoothing, the method choice, the per-layer view (most sensitive first) and the
    precision choice, where the run made them."""
    out = Console()
    smoothing = report.get("smoothing")
    if smoothing:
        out.print(f"smoothed {len(smoothing['notes'])} activations (alpha {smoothing['alpha']:g})")
    choice = report.get("method_choice")
    if choice:
        picked = Counter(c["picked"] for c in choice.values())
        counts = ", ".join(f"{method} for {n}" for method, n in picked.most_common())
        out.print(f"method auto picked {counts} of {len(choice)} activations")
    if "mixed_formats" in report:
        _print_mixed(out, report["mixed_formats"])
    if "layers" not in report:
        return
    rows = sorted(
        report["layers"], key=lambda r: r["output_error_quantized_alone"]["rel_l2"], reverse=True
    )
    title = "per-layer view: output error with only that node quantized"
    table = compact_table(
        ["node", "precision", "act SQNR dB", "weight SQNR dB", "rel L2", "cosine"], numbers=2
    )
    for row in rows:
        alone = row["output_error_quantized_alone"]
        table.add_row(
            escape(row["node"]),
            row["precision"],
            _db(row["activation_sqnr_db"]),
            _db(row["weight_sqnr_db"]),
            f"{alone['rel_l2']:.4g}",
            f"{alone['cosine']:.6f}",
        )
    print_table(out, title, table)
    precision = report.get("precision")
    if precision:
        target, share = precision["target"], precision["quantized_matmul_gemm"]
        final = precision["heldout_exported"]
        out.print(
            f"target {target['metric']} {target['value']:g}: {len(precision['float_nodes'])} "
            f"nodes left in float, {share['quantized']} of {share['of']} MatMul/Gemm quantized; "
            f"held-out cosine {final['cosine']:.5f}, rel L2 {final['rel_l2']:.4g}"
        )
        for node in precision["float_nodes"]:
            out.print(f"float: {escape(node['node'])}: {escape(node['reason'])}")


def _print_mixed(out: Console, mixed: dict) -> None:
    """The mixed-format choice: each unit's format, the count per format, the bits and the
    exported model's held-out error."""
    alone = [f"{f} alone" for f in mixed["formats"][:-1]]
    title = "mixed formats: each node's format; output cosine with it alone at each"
    table = compact_table(["node", "format", *alone], numbers=len(alone))
    for row in mixed["units"]:
        alone = row["output_error_alone"]
        table.add_row(
            escape(row["unit"]), row["format"], *(f"{a['cosine']:.6f}" for a in alone.values())
        )
    print_table(out, title, table)
    counts = Counter(row["format"] for row in mixed["units"])
    spread = ", ".join(f"{f} {counts[f]}" for f in mixed["formats"] if counts[f])
    target, bits = mixed["target"], mixed["bits"]
    final = mixed.get("heldout_exported", mixed["heldout_switchable"])
    out.print(
        f"target {target['metric']} {target['value']:g}: {spread}; "
        f"{_bits(bits['per_weight'])} bits per weight, {_bits(bits['per_activation'])} per "
        f"activation; held-out cosine {final['cosine']:.5f}, rel L2 {final['rel_l2']:.4g}"
    )


def _bits(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _db(values: dict) -> str:
    return ", ".join("exact" if v is None else f"{v:.1f}" for v in values.values())
