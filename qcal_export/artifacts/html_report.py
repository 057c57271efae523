"""The run report as one self-contained HTML page, built from the JSON report alone (a report
from another machine renders the same): warnings first, then the run, the output error, the
accuracy steps, the activations and the weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qcal_export.artifacts import html_sections as sections
from qcal_export.artifacts.html_page import esc, page
from qcal_export.artifacts.html_plots import require_matplotlib
from qcal_export.artifacts.html_tensors import activations, weights
from qcal_export.artifacts.report import SCHEMA_VERSION
from qcal_export.errors import ReportError
from qcal_export.files.atomic import write_file


def load_report(path: str | Path) -> dict[str, Any]:
    """A saved JSON report; ReportError naming the file where it is not one this version
    renders (not JSON, or another ``schema_version``)."""
    try:
        report = json.loads(Path(path).read_text())
    except OSError as e:
        raise ReportError(f"cannot read the report {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ReportError(f"{path} is not a JSON report: {e}") from None
    version = report.get("schema_version") if isinstance(report, dict) else None
    if version != SCHEMA_VERSION:
        raise ReportError(
            f"{path} has schema_version {version!r}; this qcal renders version "
            f"{SCHEMA_VERSION}: write the report again with this qcal (qcal calibrate --report)"
        )
    return report


def render_html(report: dict[str, Any]) -> str:
    """The page for ``report`` (a dict as ``build_report`` makes it)."""
    require_matplotlib()
    name = Path(report["model"]).name
    quantized = len(report["quantized_nodes"])
    header = (
        f"<h1>qcal report: {esc(name)}</h1>"
        f"<p class='sub'>{quantized} nodes quantized; schema version "
        f"{report['schema_version']}</p>"
    )
    parts = [
        header,
        sections.verdict(report),
        sections.warnings(report),
        sections.summary(report),
        sections.output_error(report),
        sections.layers(report),
        sections.precision(report),
        sections.mixed_formats(report),
        sections.method_choice(report),
        sections.smoothing(report),
        activations(report),
        weights(report),
    ]
    return page(f"qcal report: {name}", [p for p in parts if p])


def write_html(path: str | Path, report: dict[str, Any]) -> Path:
    """Render ``report`` and write it to ``path`` atomically."""
    return write_file(path, render_html(report), "HTML report")
