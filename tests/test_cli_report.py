"""``qcal calibrate --html`` and ``qcal report REPORT -o PAGE``: the page from the run equals the
page from its saved JSON; a bad report, an output on the report or on another output, or a
missing matplotlib is one ``qcal: error:`` line, exit 2, nothing written."""

from __future__ import annotations

import sys

import pytest
from error_lines import assert_one_error_line, good

from qcal_export.cli import main

pytest.importorskip("matplotlib")


def _calibrate(workdir, out, *extra):
    return main(["calibrate", *good(workdir, "-o", str(out / "q.onnx"), *extra)])


def test_calibrate_html_equals_the_page_of_the_saved_report(workdir, tmp_path, capsys):
    report, page = tmp_path / "r.json", tmp_path / "r.html"
    assert _calibrate(workdir, tmp_path, "--report", str(report), "--html", str(page)) == 0
    printed = capsys.readouterr().out
    assert "wrote the HTML report" in printed and "r.html" in printed
    again = tmp_path / "again.html"
    assert main(["report", str(report), "-o", str(again)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {again}"
    assert again.read_text() == page.read_text()
    assert page.read_text().count("<svg") >= 3


def test_html_alone_needs_no_json(workdir, tmp_path, capsys):
    page = tmp_path / "only.html"
    assert _calibrate(workdir, tmp_path, "--html", str(page)) == 0
    assert "<section id='activations'>" in page.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["only.html", "q.onnx"]


@pytest.mark.parametrize(
    ("write", "argv", "pattern"),
    [
        (None, ["missing.json", "-o", "p.html"], r"cannot read the report .*missing\.json"),
        ("{", ["r.json", "-o", "p.html"], r"r\.json is not a JSON report"),
        ('{"schema_version": 0}', ["r.json", "-o", "p.html"], r"schema_version 0; this qcal"),
        ("{}", ["r.json", "-o", "r.json"], r"-o .*r\.json is the report read \(REPORT\)"),
        ("{}", ["r.json", "-o", "nodir/p.html"], r"nodir"),
    ],
)
def test_report_refuses_in_one_line(tmp_path, monkeypatch, capsys, write, argv, pattern):
    monkeypatch.chdir(tmp_path)
    if write is not None:
        (tmp_path / "r.json").write_text(write)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["report", *argv]) == 2
    assert_one_error_line(capsys.readouterr(), pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_html_on_the_report_is_refused(workdir, tmp_path, capsys):
    same = str(tmp_path / "r.out")
    assert _calibrate(workdir, tmp_path, "--report", same, "--html", same) == 2
    assert_one_error_line(capsys.readouterr(), r"--report .*r\.out and --html .* the same file")
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_is_one_line_before_the_run(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert _calibrate(workdir, tmp_path, "--html", str(tmp_path / "p.html")) == 2
    assert_one_error_line(capsys.readouterr(), r"pip install 'qcal-export\[report\]'$")
    assert list(tmp_path.iterdir()) == []
