"""The HTML report's plots: matplotlib figures rendered to inline SVG (text kept as text, no
external asset), each built from the JSON report's values alone.

matplotlib is the ``report`` extra: ``require_matplotlib`` says so in one line where it is
missing, before a run starts.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from qcal_export.errors import ReportError

WIDE, HALF, HEIGHT = 7.5, 5.9, 2.6
"""Plot sizes in inches: a chart, a plot two of which sit side by side, and a row's height."""
MARKERS = ("#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
"""Colours of the amax markers, one per method in the order the report lists them."""


def require_matplotlib() -> None:
    """ReportError naming the extra to install where matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError(
            "the HTML report (--html, qcal report) draws its plots with matplotlib, which is not "
            "installed: pip install 'qcal-export[report]'"
        ) from None


def _figure(height: float = HEIGHT, width: float = WIDE):
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "qcal", "font.size": 9})
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg(fig) -> str:
    """The figure as an ``<svg>`` element (no XML prolog), to inline in the page."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def bar_chart(labels: Sequence[str], values: Sequence[float], xlabel: str, title: str) -> str:
    """Horizontal bars, largest first (the caller sorts), one row per label."""
    fig = _figure(height=0.9 + 0.22 * len(labels))
    ax = fig.add_subplot()
    rows = list(range(len(labels)))[::-1]
    ax.barh(rows, values, color="#4c78a8")
    ax.set_yticks(rows, [_short(label) for label in labels])
    ax.set_xlabel(xlabel)
    ax.set_title(title, loc="left")
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig)


def steps_chart(
    labels: Sequence[str], rel_l2: Sequence[float], cosine: Sequence[float], target: dict
) -> str:
    """The precision search's steps: held-out rel L2 (left axis) and cosine (right axis) after
    each node left in float, the target dotted on its axis."""
    fig = _figure(height=3.2)
    ax = fig.add_subplot()
    steps = list(range(len(labels)))
    ax.plot(steps, rel_l2, marker="o", color=MARKERS[0], label="rel L2")
    ax.set_ylabel("held-out rel L2", color=MARKERS[0])
    right = ax.twinx()
    right.plot(steps, cosine, marker="s", color=MARKERS[1], label="cosine")
    right.set_ylabel("held-out cosine", color=MARKERS[1])
    axis = right if target["metric"] == "cosine" else ax
    axis.axhline(target["value"], color="#555", ls=":", lw=1)
    ax.set_xticks(steps, [_short(label, 28) for label in labels], rotation=30, ha="right")
    ax.set_xlabel("step (each leaves one more node in float)")
    ax.set_title(f"precision search: target {target['metric']} {target['value']:g}", loc="left")
    ax.grid(alpha=0.3)
    return _svg(fig)


def activation_plot(name: str, detail: dict[str, Any], chosen: dict[str, Any] | None) -> str:
    """The activation's histogram (log counts) with each method's amax marked, the chosen
    method's bold; beside it, the MSE methods' loss over their candidates, minimum marked."""
    losses = detail.get("mse_loss") or {}
    methods = dict.fromkeys([*detail["ranges"], *losses])
    colours = dict(zip(methods, MARKERS * 2, strict=False))
    fig = _figure(width=WIDE if losses else HALF)
    axes = fig.subplots(1, 2 if losses else 1, squeeze=False)[0]
    _histogram(axes[0], detail, chosen, colours)
    axes[0].set_title(_short(name, 60), loc="left")
    if losses:
        _losses(axes[1], losses, colours)
    return _svg(fig)


def _histogram(
    ax, detail: dict[str, Any], chosen: dict[str, Any] | None, colours: dict[str, str]
) -> None:
    hist = detail.get("histogram")
    if hist:
        counts = hist["counts"]
        edges = [hist["low"] + i * hist["width"] for i in range(len(counts))]
        ax.bar(edges, counts, width=hist["width"], align="edge", color="#9ecae1", linewidth=0)
        ax.set_yscale("log")
        for seen in (hist["min"], hist["max"]):
            ax.axvline(seen, color="#777", lw=0.8, ls=":")
        counted = sum(counts)
        if counted < hist["values"]:
            ax.set_ylabel(f"count (1 in {hist['values'] / counted:.0f} sampled)")
    else:
        ax.text(0.5, 0.5, "no histogram kept", ha="center", transform=ax.transAxes)
    picked = chosen["method"] if chosen else None
    for method, found in detail["ranges"].items():
        colour = colours[method]
        bold = method == picked
        low = found.get("min", -found["amax"])
        high = found.get("max", found["amax"])
        for x in (low, high) if low != 0 else (high,):
            ax.axvline(x, color=colour, lw=2.2 if bold else 1, ls="-" if bold else "--")
        ax.plot([], [], color=colour, lw=2.2 if bold else 1, label=_method_label(method, bold))
    ax.set_xlabel("value (markers: each method's range; dotted: seen)")
    if not ax.get_ylabel():
        ax.set_ylabel("count")
    ax.legend(fontsize=7, loc="upper right")


def _losses(ax, losses: dict[str, Any], colours: dict[str, str]) -> None:
    for method, loss in losses.items():
        ax.plot(loss["amax"], loss["mse"], color=colours[method], label=method)
        best = loss["best"]
        ax.plot([loss["amax"][best]], [loss["mse"][best]], "o", color=colours[method])
    ax.set_yscale("log")
    ax.set_xlabel("candidate amax (dot: the minimum)")
    ax.set_ylabel("squared error per value")
    ax.set_title("MSE loss over candidates", loc="left")
    ax.legend(fontsize=7)


def heat_map(name: str, grid: dict[str, Any]) -> str:
    """A weight's block amaxes (log2) as a heat map, one cell per ``cell`` blocks."""
    cells = [[math.nan if v is None else v for v in row] for row in grid["log2_amax"]]
    fig = _figure(height=2.4, width=3.6)
    ax = fig.add_subplot()
    image = ax.imshow(cells, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="log2 block amax")
    rows, cols = grid["cell"]
    ax.set_xlabel(f"block column (x{cols})" if cols > 1 else "block column")
    ax.set_ylabel(f"row (x{rows})" if rows > 1 else "row")
    ax.set_title(_short(name, 40), loc="left", fontsize=8)
    return _svg(fig)


def _method_label(method: str, chosen: bool) -> str:
    return f"{method} (chosen)" if chosen else method


def _short(text: str, width: int = 40) -> str:
    """``text`` cut in its middle to ``width`` characters (names keep their start and end)."""
    if len(text) <= width:
        return text
    half = (width - 1) // 2
    return f"{text[:half]}…{text[-(width - 1 - half) :]}"
