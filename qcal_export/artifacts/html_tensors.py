"""The HTML report's per-tensor sections: each activation's histogram with the ranges its
methods chose and the MSE losses, each weight's error and block amaxes; tables hold every
tensor, plots the first ``MAX_ACTIVATION_PLOTS`` / ``MAX_HEAT_MAPS`` (the page stays small)."""

from __future__ import annotations

from typing import Any

from qcal_export.artifacts import html_plots as plots
from qcal_export.artifacts.html_page import details, section, table
from qcal_export.artifacts.html_sections import TOP_BARS

MAX_ACTIVATION_PLOTS = 48
MAX_HEAT_MAPS = 24


def activations(report: dict[str, Any]) -> str:
    """Every activation in a table (chosen method and range, the share of values it clips, how
    far its amax lies past nearly all values); the first ``MAX_ACTIVATION_PLOTS`` plotted, the
    most clipped first, then those whose amax outliers stretch most."""
    rows = {r["tensor"]: r for r in report["tensors"] if r["kind"] == "activation"}
    detail = report.get("activations") or {}
    if not rows:
        return ""
    headers = ["activation", "format", "method", "amax", "seen min", "seen max", "% clipped"]
    headers.append("amax / p99.9 |x|")
    table_rows, order = [], []
    for name, row in rows.items():
        found = detail.get(name) or {}
        hist = found.get("histogram")
        seen = _seen(hist) if hist else (None, None)
        clipped = _clipped(hist, row) if hist else None
        stretch = row["amax"] / _quantile_abs(hist, 0.999) if hist else None
        table_rows.append(
            [name, row["format"], row["method"], row["amax"], *seen, clipped, stretch]
        )
        if hist:
            order.append((-(clipped or 0.0), -(stretch or 0.0), name))
    plotted = [name for *_, name in sorted(order)[:MAX_ACTIVATION_PLOTS]]
    figures = [
        plots.activation_plot(name, detail[name], {"method": rows[name]["method"]})
        for name in plotted
    ]
    parts = []
    if figures:
        more = len(order) - len(plotted)
        title = f"{len(plotted)} activations: most clipped, then most stretched by outliers"
        title += f" ({more} more in the table below)" if more > 0 else ""
        parts.append(f"<h3>{title}</h3><div class='plots'>{''.join(figures)}</div>")
    parts.append(
        details(f"all {len(rows)} activations (sortable table)", table(headers, table_rows))
    )
    lead = (
        "Each activation's values as the calibration saw them (log counts), with the range each "
        "method chose marked (the chosen one bold) and, for MSE methods, the squared error of "
        "every candidate amax. '% clipped': the share of values outside the chosen range; "
        "'amax / p99.9 |x|': how far the amax lies past 99.9% of the values (large: a few "
        "outliers set the scale and the rest get few levels)."
    )
    return section("activations", "Activations", parts, lead)


def weights(report: dict[str, Any]) -> str:
    """Every weight's relative error (table and sorted bars) and, for block formats, heat maps
    of its block amaxes."""
    rows = [r for r in report["tensors"] if r["kind"] == "weight"]
    if not rows:
        return ""
    worst = sorted(rows, key=lambda r: r.get("weight_rel_error", 0.0), reverse=True)
    headers = ["weight", "format", "method", "granularity", "amax", "rel error"]
    error = "weight_rel_error"
    table_rows = [
        [r["tensor"], r["format"], r["method"], r["granularity"], r["amax"], r.get(error)]
        for r in worst
    ]
    errors = [r for r in worst if "weight_rel_error" in r][:TOP_BARS]
    parts = []
    if errors:
        parts.append(
            plots.bar_chart(
                [r["tensor"] for r in errors],
                [r["weight_rel_error"] for r in errors],
                "||dequantize(quantize(W)) - W|| / ||W||",
                f"weight relative error, largest first ({len(errors)} of {len(rows)})",
            )
        )
    parts.append(details(f"all {len(rows)} weights (sortable table)", table(headers, table_rows)))
    grids = [r for r in worst if "block_scales" in r][:MAX_HEAT_MAPS]
    if grids:
        maps = "".join(plots.heat_map(r["tensor"], r["block_scales"]) for r in grids)
        title = f"block amaxes of {len(grids)} block-scaled weights, largest error first"
        parts.append(f"<h3>{title}</h3><div class='plots'>{maps}</div>")
    lead = "Each weight's relative error after quantization, as the exported model stores it."
    return section("weights", "Weights", parts, lead)


def _seen(hist: dict[str, Any]) -> tuple[float, float]:
    """The range of the values seen (including 0)."""
    return hist["min"], hist["max"]


def _quantile_abs(hist: dict[str, Any], share: float) -> float:
    """The smallest bin edge magnitude that ``share`` of the values lie within (to a bin)."""
    width, counts = hist["width"], hist["counts"]
    edges = [
        max(abs(hist["low"] + i * width), abs(hist["low"] + (i + 1) * width))
        for i in range(len(counts))
    ]
    total, seen = sum(counts), 0
    for edge, count in sorted(zip(edges, counts, strict=True)):
        seen += count
        if seen >= share * total:
            return edge or width
    return max(edges)


def _clipped(hist: dict[str, Any], row: dict[str, Any]) -> float:
    """Percent of the values in bins wholly outside the chosen range (which holds 0: an
    asymmetric range is widened to it)."""
    low = min(row.get("min", -row["amax"]), 0.0)
    high = max(row.get("max", row["amax"]), 0.0)
    width, counts = hist["width"], hist["counts"]
    total = sum(counts) or 1
    outside = sum(
        c
        for i, c in enumerate(counts)
        if hist["low"] + (i + 1) * width <= low or hist["low"] + i * width > high
    )
    return 100.0 * outside / total
