"""The HTML report in a real browser (Debian's headless Chromium; skipped where it is absent,
CI installs it): the page loads with no console message, its scripts ran (tables sortable) and
its plots are in the DOM. A page with a script error shows the check catches one."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from report_runs import run_report

pytest.importorskip("matplotlib")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--enable-logging=stderr",
    "--v=0",
)


def browse(page: Path, profile: Path) -> tuple[str, list[str]]:
    """The DOM after the page loaded and its scripts ran, and the console messages it logged."""
    done = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def test_the_report_loads_clean_with_its_plots(workdir, tmp_path):
    from qcal_export.artifacts.html_report import write_html

    report = run_report(workdir, tmp_path, "auto")
    page = write_html(tmp_path / "r.html", report)
    dom, console = browse(page, tmp_path / "profile")
    assert console == []
    source = page.read_text()
    plots = source.count("<svg")
    assert plots >= 5 and dom.count("<svg") == plots
    heads = re.findall(r"<table class='sortable'><thead><tr>(.*?)</tr></thead>", source)
    sortable = sum(head.count("<th>") for head in heads)
    assert sortable > 0 and dom.count('<th class="sort">') == sortable  # the script ran
    assert '<section id="activations">' in dom


def test_a_script_error_is_caught(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><script>notDefined();</script></body></html>")
    _, console = browse(page, tmp_path / "profile")
    assert any("notDefined is not defined" in line for line in console)
