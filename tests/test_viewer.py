"""The report viewer in headless Chromium: map over its lesion, threshold slider, loopback only."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from browser import Browser
from scipy import ndimage

from medanomaly.data.phantoms import make_phantoms
from medanomaly.detectors.base import AnomalyResult
from medanomaly.outputs.viewer import ViewerVolumes, outline
from medanomaly.reports.html import Facts, write_report
from medanomaly.reports.serve import serve_in_background
from medanomaly.reports.viewer import STATIC_FILES, VIEWER_DIR, Viewer, install_static, ordered

THRESHOLD = 2.0


def _lesion_case():
    """A 2D phantom with a planted bright lesion, and a map that is high on the lesion only."""
    cases = make_phantoms(1, 1, (64, 64), seed=4).subset([1])  # the bright-lesion phantom
    lesion = cases.masks[0]
    assert lesion.sum() > 20
    score_map = ndimage.gaussian_filter(lesion.astype(np.float32), 1.0) * 10.0
    return cases, score_map


def _report(folder, cases, score_map, extra=()):
    result = AnomalyResult(np.array([5.0]), np.array([1]), score_map[None], None, THRESHOLD)
    volumes = ViewerVolumes(folder / VIEWER_DIR)
    entries = volumes.write(cases, result, [0])
    entries += list(extra)
    install_static(folder / VIEWER_DIR)
    viewer = Viewer("Viewer", entries, threshold=THRESHOLD)
    write_report(folder / "report.html", "viewer test", [Facts("x", [("a", 1)]), viewer])
    return entries


def _canvas(browser):
    box = browser.evaluate(
        "(() => { const r = document.getElementById('mv-canvas').getBoundingClientRect();"
        " return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}; })()"
    )
    return np.asarray(browser.screenshot(box), dtype=np.int16)


def _set_threshold(browser, value):
    browser.evaluate(
        "(() => { const s = document.getElementById('mv-threshold');"
        f" s.value = String({value}); s.dispatchEvent(new Event('input')); }})()"
    )
    browser.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def test_the_map_shows_on_its_lesion_and_the_slider_clears_it(tmp_path):
    cases, score_map = _lesion_case()
    entries = _report(tmp_path, cases, score_map)
    assert entries[0]["grid"] == "model" and entries[0]["outline"]
    server, url = serve_in_background(tmp_path)
    try:
        with Browser(1200, 1000) as browser:
            browser.open(url)
            browser.wait_for("document.getElementById('mv').dataset.state === 'ready'")
            browser.evaluate("document.getElementById('mv').scrollIntoView()")
            start = float(browser.evaluate("document.getElementById('mv-threshold').value"))
            assert start == pytest.approx(THRESHOLD)
            shown = _canvas(browser)
            _set_threshold(browser, browser.evaluate("document.getElementById('mv-threshold').max"))
            cleared = _canvas(browser)
            requests, console = browser.requests, browser.console
    finally:
        server.shutdown()
    assert console == []
    outside = [u for u in requests if not u.startswith(("http://127.0.0.1:", "data:", "blob:"))]
    assert outside == [], f"requests outside loopback: {outside}"
    assert any(u.endswith("_map.nii.gz") for u in requests)
    # the overlay: what the slider above the map's maximum removed
    overlay = np.abs(shown - cleared).sum(axis=2) > 60
    assert overlay.sum() > 200, "no overlay colour at the run's cut-off"
    warm = shown[overlay]
    assert np.median(warm[:, 0] - warm[:, 2]) > 60, "the overlay is not in the warm colour map"
    # the lesion on screen: the green outline of its label mask (drawn in both pictures)
    red, green, blue = (cleared[..., c] for c in range(3))
    ring = (green > 150) & (red < 90) & (blue < 90)
    assert ring.sum() > 50, "no label outline"
    rows, cols = np.nonzero(ring)
    margin = 0.15 * max(np.ptp(rows), np.ptp(cols))
    over_rows, over_cols = np.nonzero(overlay)
    inside = (
        (over_rows >= rows.min() - margin)
        & (over_rows <= rows.max() + margin)
        & (over_cols >= cols.min() - margin)
        & (over_cols <= cols.max() + margin)
    )
    assert inside.all(), f"{(~inside).sum()} overlay pixels lie away from the lesion"


def test_a_file_page_keeps_its_note_and_loads_no_volume(tmp_path):
    cases, score_map = _lesion_case()
    _report(tmp_path, cases, score_map)
    with Browser(1000, 800) as browser:
        browser.open((tmp_path / "report.html").as_uri())
        time.sleep(0.5)
        assert browser.evaluate("document.getElementById('mv').dataset.state") == "offline"
        assert browser.evaluate("document.getElementById('mv-offline').hidden") is False
        assert not [u for u in browser.requests if ".nii" in u]
        assert browser.console == []


def test_flagged_cases_come_first_then_by_score(tmp_path):
    cases, score_map = _lesion_case()
    base = {"id": "x", "name": "x", "label": -1, "dims": 2, "map_min": 0.0, "map_max": 1.0}
    entries = [
        {**base, "index": 0, "score": 9.0, "flagged": False},
        {**base, "index": 1, "score": 3.0, "flagged": True},
        {**base, "index": 2, "score": 4.0, "flagged": True},
        {**base, "index": 3, "score": 1.0, "flagged": False},
    ]
    assert [e["index"] for e in ordered(entries)] == [2, 1, 0, 3]
    page = _report(tmp_path, cases, score_map)
    html = (tmp_path / "report.html").read_text()
    assert "connect-src 'self'" in html and "https:" not in html.split("<body>")[0]
    data = json.loads(html.split("id='mv-cases'>")[1].split("</script>")[0].replace("<\\/", "</"))
    assert data == ordered(page)
    assert sorted(p.name for p in (tmp_path / VIEWER_DIR).iterdir()) == sorted(
        [*STATIC_FILES, "cases"]
    )


def test_outline_is_the_boundary_of_the_mask():
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    ring = outline(mask)
    assert ring.sum() == 16 and ring[3, 3] == 0 and ring[1, 3] == 1


def test_view_serves_a_report_on_loopback_and_refuses_a_folder_without_one(tmp_path):
    cases, score_map = _lesion_case()
    _report(tmp_path, cases, score_map)
    command = [sys.executable, "-m", "medanomaly.cli", "view", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "127.0.0.1 only" in line
        url = line.split("open ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/report.html")
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert "viewer test" in answer.read().decode()
            assert "connect-src 'self'" in answer.headers["Content-Security-Policy"]
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(url.replace("report.html", "../../etc/passwd"), timeout=10)
    finally:
        process.terminate()
        process.wait(timeout=10)
    refused = subprocess.run(
        [sys.executable, "-m", "medanomaly.cli", "view", str(tmp_path / "viewer")],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "no report.html" in refused.stderr
