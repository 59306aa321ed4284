"""The HTML report: self-contained, escaped, sortable, and rendered by headless Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medanomaly.reports import figures as figs
from medanomaly.reports.html import Facts, Figure, Figures, Table, Text, render_report

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
)


def chromium(page: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium on a local page (skips the test when Chromium is missing)."""
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install -y chromium; .ci/run installs it)")
    profile = workdir / "chromium-profile"
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def console_messages(stderr: str) -> list[str]:
    """Console output of the page (errors, failed loads, uncaught exceptions) in the log."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def check_renders(page: Path, workdir: Path) -> str:
    """Render ``page``: no console message, every figure shown, a non-blank screenshot.

    Returns:
        The DOM after the page's scripts ran.
    """
    dom = chromium(page, workdir, "--dump-dom")
    assert console_messages(dom.stderr) == []
    match = re.search(r'data-figures-shown="(\d+)/(\d+)"', dom.stdout)
    assert match, "the report's load script did not run"
    shown, total = map(int, match.groups())
    assert total > 0 and shown == total, f"{shown} of {total} figures rendered"
    shot = workdir / "screenshot.png"
    result = chromium(page, workdir, f"--screenshot={shot}", "--window-size=1200,2000")
    assert console_messages(result.stderr) == []
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, "screenshot is (nearly) blank"
    return dom.stdout


@pytest.fixture
def figure_files(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0] * 10 + [1] * 6)
    scores = rng.normal(size=16) + labels
    return [
        Figure(figs.plot_roc([(labels, scores, 0.5)], tmp_path / "roc.png"), "ROC", "cut-off"),
        Figure(figs.plot_score_histograms(labels, scores, 0.5, tmp_path / "h.png"), "Hist"),
    ]


def _blocks(figure_files):
    rows = [["case<b>&1", 1, 0.25, None], ["case2", 0, 10.0, 0.5], ["case3", 0, 2.0, 0.1]]
    return [
        Facts("Headline", [("AUROC", 0.81234567), ("rule", "f1"), ("missing", None)]),
        Figures("Figures", [*figure_files, Figure(Path("/no/such/file.png"), "gone")]),
        Table("Cases", ["id", "label", "score", "p_value"], rows, row_classes=["abnormal", "", ""]),
        Text("Note", "<script>alert(1)</script>"),
    ]


def test_report_is_self_contained_and_escaped(figure_files):
    page = render_report("Report <1>", _blocks(figure_files), subtitle="run & data")
    sources = re.findall(r"<img src='([^']+)'", page)
    assert len(sources) == 2  # the missing file is left out
    for uri, figure in zip(sources, figure_files, strict=True):
        assert uri.startswith("data:image/png;base64,")
        assert base64.b64decode(uri.split(",", 1)[1]) == figure.path.read_bytes()
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page)
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert "case&lt;b&gt;&amp;1" in page and "Report &lt;1&gt;" in page
    assert "Content-Security-Policy" in page and "0.8123" in page and "n/a" in page


def _click_script(header: int, clicks: int) -> str:
    return (
        "<script>window.addEventListener('load', function () {"
        f"var th = document.querySelector('table.sortable thead th:nth-child({header})');"
        f"for (var i = 0; i < {clicks}; i++) {{ th.click(); }}"
        "var ids = Array.prototype.map.call(document.querySelectorAll('table.sortable tbody tr'),"
        " function (r) { return r.cells[0].textContent; });"
        "document.body.setAttribute('data-order', ids.join('|'));"
        "});</script></body>"
    )


@pytest.mark.parametrize(
    ("header", "clicks", "order"),
    [
        (3, 1, "case<b>&1|case3|case2"),  # score ascending: numeric, not text order
        (3, 2, "case2|case3|case<b>&1"),  # second click: descending
        (4, 1, "case3|case2|case<b>&1"),  # p_value ascending, blank last
        (1, 1, "case2|case3|case<b>&1"),  # id ascending (text)
    ],
)
def test_clicking_a_header_sorts_the_table(tmp_path, figure_files, header, clicks, order):
    page = render_report("Sort", _blocks(figure_files))
    path = tmp_path / "sort.html"
    path.write_text(page.replace("</body>", _click_script(header, clicks), 1))
    dom = chromium(path, tmp_path, "--dump-dom")
    assert console_messages(dom.stderr) == []
    found = re.search(r'data-order="([^"]*)"', dom.stdout).group(1)
    assert found.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") == order


def test_report_renders_in_headless_chromium(tmp_path, figure_files):
    path = tmp_path / "report.html"
    path.write_text(render_report("Render", _blocks(figure_files)))
    dom = check_renders(path, tmp_path)
    assert "Headline" in dom


def test_a_broken_figure_is_reported_on_the_console(tmp_path):
    page = render_report("Broken", [Facts("x", [("a", 1)])])
    broken = "<img src='data:image/png;base64,AAAA' alt='bad'></body>"
    path = tmp_path / "broken.html"
    path.write_text(page.replace("</body>", broken, 1))
    dom = chromium(path, tmp_path, "--dump-dom")
    assert any("figure failed to load: bad" in line for line in console_messages(dom.stderr))
    assert 'data-figures-shown="0/1"' in dom.stdout
