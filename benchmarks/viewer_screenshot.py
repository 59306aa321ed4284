"""A screenshot of a report's viewer (the README's picture), in headless Chromium.

    .venv/bin/python benchmarks/viewer_screenshot.py eval docs/images/viewer_quickstart.png

``eval`` is the quick start's ``evaluate`` folder (README); the first case (the
highest-scoring flagged one) is shown as the page opens it, cropped to the viewer and saved as
a small palette PNG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from browser import Browser  # noqa: E402

from medanomaly.reports.serve import serve_in_background  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a report folder (evaluate or screen OUT)")
    parser.add_argument("png", type=Path, help="the picture to write")
    parser.add_argument("--colours", type=int, default=128, help="palette size of the PNG")
    args = parser.parse_args()
    server, url = serve_in_background(args.report)
    try:
        with Browser(1200, 900) as browser:
            browser.open(url)
            browser.wait_for("document.getElementById('mv').dataset.state === 'ready'")
            browser.evaluate("document.querySelector('#mv .mv-layout').scrollIntoView()")
            browser.evaluate(
                "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
            )
            box = browser.evaluate(
                "(() => { const r = document.querySelector('#mv .mv-layout')"
                ".getBoundingClientRect(); return {x: r.left + scrollX, y: r.top + scrollY,"
                " width: r.width, height: r.height}; })()"
            )
            picture = browser.screenshot(box)
    finally:
        server.shutdown()
    picture.quantize(args.colours).save(args.png, optimize=True)
    width, height = picture.size
    print(f"wrote {args.png} ({args.png.stat().st_size // 1024} KiB, {width}x{height})")


if __name__ == "__main__":
    main()
