"""The HTML report (artifacts/html_report.py) of real runs: one self-contained page (no network,
no external asset) with the sections and plots its JSON holds, the same page from the saved
JSON as from the run."""

from __future__ import annotations

import json
import re

import pytest
from report_runs import run_report

from qcal_export.artifacts.html_report import load_report, render_html
from qcal_export.errors import ReportError

pytest.importorskip("matplotlib")

EXTERNAL = re.compile(
    r"""(src|href)\s*=\s*["']?\s*(https?:|//|file:)|<link\b|@import|url\(\s*["']?http"""
)
"""Anything a page would fetch: a script, image or style from elsewhere."""


@pytest.fixture(scope="module")
def reports(workdir, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("html")
    return {name: run_report(workdir, out, name) for name in ("auto", "nvfp4")}


def _sections(page: str) -> list[str]:
    return re.findall(r"<section id='([a-z-]+)'>", page)


def test_page_of_a_run_with_every_accuracy_step(reports):
    report = reports["auto"]
    page = render_html(report)
    assert not EXTERNAL.search(page)
    assert page.startswith("<!DOCTYPE html>") and page.count("<script>") == 1
    assert _sections(page) == [
        "warnings",
        "summary",
        "output-error",
        "layers",
        "precision",
        "method-choice",
        "smoothing",
        "activations",
        "weights",
    ]
    activations = [r for r in report["tensors"] if r["kind"] == "activation"]
    weights = [r for r in report["tensors"] if r["kind"] == "weight"]
    # layers: output error, activation and weight SQNR bars; precision: its steps; one plot per
    # activation; the weights' error bars (no block scales: no heat map)
    assert page.count("<svg") == 3 + 1 + len(activations) + (1 if weights else 0)
    assert report["verdict"]["line"].split("(")[0].strip() in page
    for node in report["precision"]["float_nodes"]:
        assert node["reason"] in page
    scored = [c for c in report["method_choice"].values() if c["samples"]]
    assert scored and "<th>samples</th>" in page
    for entry in scored:  # the picked candidate's samples follow its name in its row
        count = entry["samples"][entry["picked"]]
        assert f"<td>{entry['picked']}</td><td class='num' data-v='{count}'>{count}</td>" in page


def test_block_scaled_weights_get_heat_maps(reports):
    report = reports["nvfp4"]
    page = render_html(report)
    weights = [r for r in report["tensors"] if r["kind"] == "weight"]
    assert "activations" not in _sections(page)
    assert page.count("log2 block amax") == len(weights)
    assert page.count("<svg") == 1 + len(weights)


def test_the_saved_json_renders_the_same_page(reports, tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(reports["auto"]))
    assert render_html(load_report(path)) == render_html(reports["auto"])


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("not json", "is not a JSON report"),
        ('{"model": "m.onnx"}', "schema_version None; this qcal renders version 1"),
        ('{"schema_version": 99}', "schema_version 99"),
        ("[1, 2]", "schema_version None"),
    ],
)
def test_a_file_that_is_no_report_is_refused(tmp_path, text, pattern):
    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(ReportError, match=pattern):
        load_report(path)
