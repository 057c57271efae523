"""The HTML report's run-level sections, each from the JSON report alone: warnings, the run
summary, the output error and verdict, and the accuracy steps (per-layer view, precision
search, mixed formats, method choice, smoothing) where the run made them."""

from __future__ import annotations

from collections import Counter
from typing import Any

from qcal_export.artifacts import html_plots as plots
from qcal_export.artifacts.html_page import details, esc, key_values, number, section, table

TOP_BARS = 40
"""Most bars a per-layer chart draws (the worst first; the table below holds them all)."""


def warnings(report: dict[str, Any]) -> str:
    """What went wrong or needs a look, first on the page: runtime issues, partly quantized
    nodes, tensor notes, plan and export notes."""
    lines = []
    validation = report.get("validation") or {}
    issue = validation.get("runtime_issue")
    if issue:
        lines.append(f"runtime issue: ONNX Runtime {issue.get('kind')}: {issue.get('summary', '')}")
    for key in ("note", "stopped"):
        if validation.get(key):
            lines.append(f"validation: {validation[key]}")
    for node, why in report["partially_quantized_nodes"].items():
        lines.append(f"partly quantized: {node}: {why}")
    lines += [f"{row['tensor']}: {note}" for row in report["tensors"] for note in row["notes"]]
    lines += [*report.get("plan_notes", []), *report["export_notes"]]
    if not lines:
        return ""
    boxes = "".join(f"<div class='warn'>{esc(line)}</div>" for line in lines)
    return section("warnings", f"Warnings and notes ({len(lines)})", [boxes])


def verdict(report: dict[str, Any]) -> str:
    found = report.get("verdict")
    if not found:
        return "<div class='verdict none'>no verdict: the quantized model was not validated</div>"
    css = "pass" if found["status"] == "pass" else "fail"
    return f"<div class='verdict {css}'>{esc(found['line'])}</div>"


def summary(report: dict[str, Any]) -> str:
    """Model, formats and methods, data, validator and timings, as label/value rows."""
    recipe = report["recipe"]
    pairs: list[tuple[str, object]] = [("model", report["model"])]
    pairs += [
        (what, report[key])
        for what, key in (("quantized model", "output_model"), ("scales file", "scales_file"))
        if report.get(key)
    ]
    for kind in ("activation", "weight"):
        spec = recipe.get(kind)
        label = "none" if not spec else f"{spec['format']}, method {spec['method']}"
        pairs.append((f"{kind}s", label))
    counts = Counter(row["kind"] for row in report["tensors"])
    pairs.append(
        (
            "quantized",
            f"{len(report['quantized_nodes'])} nodes: {counts['activation']} activations, "
            f"{counts['weight']} weights (target {report.get('target', '-')})",
        )
    )
    data = report["data"]
    pairs.append(("data", "none" if data is None else data["source"]))
    pairs.append(("batches per pass", ", ".join(map(str, report["batches_per_pass"])) or "-"))
    pairs.append(("validated by", report["validator"] or "not validated"))
    pairs.append(("providers", ", ".join(report["providers"])))
    opset = report["opset"]
    pairs.append(("opset", f"{opset['from']} -> {opset['to']}"))
    timings = report["timings"]
    spent = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in timings.items())
    pairs.append(("seconds", f"{sum(timings.values()):.2f} ({spent})"))
    pairs.append(("versions", ", ".join(f"{k} {v}" for k, v in report["versions"].items())))
    return section("summary", "Run", [key_values(pairs)])


def output_error(report: dict[str, Any]) -> str:
    """The error users get per graph output, with the reference's rel L2 beside it."""
    errors = report["output_error"]
    if not errors:
        return ""
    validation = report.get("validation") or {}
    reference = validation.get("reference") if validation.get("default") is not None else None
    headers = ["output", "cosine", "rel L2", "max abs diff"]
    headers += ["rel L2, optimizations off"] if reference else []
    rows = [
        [name, e["cosine"], e["rel_l2"], e["max_abs"]]
        + ([reference[name]["rel_l2"]] if reference else [])
        for name, e in errors.items()
    ]
    parts = [table(headers, rows)]
    if validation.get("batches"):
        parts.append(f"<p>validation batches: {esc(validation['batches'])}</p>")
    metric = report.get("metric")
    if metric:
        values = ", ".join(f"{k} {number(v)}" for k, v in metric["values"].items())
        parts.append(f"<p>task metric ({esc(metric['function'])}): {esc(values or 'no batch')}</p>")
    lead = "Each graph output of the quantized model against the float model "
    lead += f"({report['validator']})."
    return section("output-error", "Output error", parts, lead)


def layers(report: dict[str, Any]) -> str:
    """The per-layer view: output error with each node alone quantized and the SQNRs, as
    sorted bar charts and a table; the nodes the precision search left in float."""
    rows = report.get("layers")
    if not rows:
        return ""
    worst = sorted(rows, key=lambda r: r["output_error_quantized_alone"]["rel_l2"], reverse=True)
    top = worst[:TOP_BARS]
    parts = [
        plots.bar_chart(
            [r["node"] for r in top],
            [r["output_error_quantized_alone"]["rel_l2"] for r in top],
            "output rel L2 with only this node quantized",
            f"most sensitive nodes ({len(top)} of {len(rows)})",
        )
    ]
    for key, what in (("activation_sqnr_db", "activation"), ("weight_sqnr_db", "weight")):
        lowest = sorted((r for r in rows if _sqnr(r[key]) is not None), key=lambda r: _sqnr(r[key]))
        if lowest:
            parts.append(
                plots.bar_chart(
                    [r["node"] for r in lowest[:TOP_BARS]][::-1],
                    [_sqnr(r[key]) for r in lowest[:TOP_BARS]][::-1],
                    f"lowest {what} SQNR of the node (dB; higher is better)",
                    f"{what} SQNR, lowest last",
                )
            )
    headers = ["node", "precision", "act SQNR dB", "weight SQNR dB", "rel L2 alone", "cosine alone"]
    table_rows = [
        [
            r["node"],
            r["precision"],
            _sqnr(r["activation_sqnr_db"]),
            _sqnr(r["weight_sqnr_db"]),
            r["output_error_quantized_alone"]["rel_l2"],
            r["output_error_quantized_alone"]["cosine"],
        ]
        for r in worst
    ]
    parts.append(table(headers, table_rows))
    lead = (
        "Each quantized node alone: the graph outputs' error when only it is quantized, and the "
        "SQNR of its activations and weights (lowest of its tensors; exact tensors left out)."
    )
    return section("layers", "Per-layer view", parts, lead)


def precision(report: dict[str, Any]) -> str:
    """The precision search: its steps as a line chart and the nodes left in float, and why."""
    found = report.get("precision")
    if not found:
        return ""
    steps = found["steps"]
    parts = []
    if steps:
        parts.append(
            plots.steps_chart(
                [s["change"] for s in steps],
                [s["rel_l2"] for s in steps],
                [s["cosine"] for s in steps],
                found["target"],
            )
        )
    rows = [[n["node"], n["reason"]] for n in found["float_nodes"]]
    parts.append(table(["node left in float", "why"], rows))
    share = found.get("quantized_matmul_gemm")
    lead = f"{len(rows)} nodes left in float to reach the target" + (
        f"; {share['quantized']} of {share['of']} MatMul/Gemm quantized." if share else "."
    )
    return section("precision", "Precision search", parts, lead)


def mixed_formats(report: dict[str, Any]) -> str:
    mixed = report.get("mixed_formats")
    if not mixed:
        return ""
    formats = mixed["formats"]
    headers = ["node", "format", *(f"cosine, {f} alone" for f in formats[:-1])]
    rows = [
        [u["unit"], u["format"], *(a["cosine"] for a in u["output_error_alone"].values())]
        for u in mixed["units"]
    ]
    counts = Counter(u["format"] for u in mixed["units"])
    lead = "Each node's format: " + ", ".join(f"{f} {counts[f]}" for f in formats if counts[f])
    return section("mixed", "Mixed formats", [table(headers, rows)], lead)


def method_choice(report: dict[str, Any]) -> str:
    """Method auto's choice per activation and each candidate's output error."""
    choice = report.get("method_choice")
    if not choice:
        return ""
    methods = sorted({m for c in choice.values() for m in c["output_rel_l2"]})
    headers = ["activation", "picked", "samples", *(f"rel L2, {m}" for m in methods)]
    rows = [
        [t, pick, c["samples"].get(pick), *(c["output_rel_l2"].get(m) for m in methods)]
        for t, c in choice.items()
        for pick in [c["picked"]]
    ]
    picked = Counter(c["picked"] for c in choice.values())
    lead = "Method auto: per activation, the method whose output error (that activation alone "
    lead += "quantized) is lowest among those scored on the most samples; a candidate dropped "
    lead += "from the race on its first samples shows its error over those. Picked: "
    lead += ", ".join(f"{m} {n}" for m, n in picked.items())
    exact = sum("exact" in c for c in choice.values())
    if exact:
        lead += f". {exact} constant(s) of one value keep max unscored (its scale is exact)"
    return section("method-choice", "Method choice", [table(headers, rows)], lead)


def smoothing(report: dict[str, Any]) -> str:
    found = report.get("smoothing")
    if not found:
        return ""
    notes = "".join(f"<li>{esc(n)}</li>" for n in found["notes"])
    lead = f"SmoothQuant (alpha {found['alpha']:g}) on {len(found['notes'])} activations."
    folded = details("what was smoothed", f"<ul>{notes}</ul>")
    return section("smoothing", "Smoothing", [folded], lead)


def _sqnr(values: dict[str, float | None]) -> float | None:
    """The lowest SQNR of a node's tensors (None: all exact or none)."""
    found = [v for v in values.values() if v is not None]
    return min(found) if found else None
