"""The interactive viewer of a report: each case's scan with its anomaly map, in the page.

The :class:`Viewer` block lists the cases (flagged first, then by score) beside one WebGL
panel: NiiVue (vendored in ``static/``, see its README) draws the scan with the map over it,
with a colour map, an opacity and a threshold slider that starts at the run's cut-off, the
three planes of a volume (scroll with the mouse wheel) or the one slice of a picture, and
the label mask's outline where there is one. A case's volumes are fetched only when it is
opened, so a report with hundreds of cases loads one case at a time.

Browsers refuse ``fetch`` from a ``file://`` page, so the viewer runs when the report folder
is served (``medanomaly view OUT``: 127.0.0.1 only); opened as a file, the rest of the
report works and the viewer says how to start it. Nothing is loaded from outside the report
folder: the page's Content-Security-Policy allows scripts and fetches from its own origin only.
The volumes themselves are written by :mod:`medanomaly.outputs.viewer`.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medanomaly.viz.case_figure import unique_names

STATIC = Path(__file__).resolve().parent / "static"
"""The vendored NiiVue bundle, its licence and version, and ``viewer.js``."""
STATIC_FILES = ("niivue.umd.js", "viewer.js", "NIIVUE_LICENSE.txt", "NIIVUE_VERSION.txt")
VIEWER_DIR = "viewer"
"""The viewer's folder inside a report folder."""
CASES_DIR = "cases"
"""The case volumes' folder inside :data:`VIEWER_DIR`."""

VIEWER_CSP = (
    "default-src 'none'; img-src data: blob:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline' 'self'; connect-src 'self'"
)
"""The policy of a report with a viewer: its own origin's scripts and volumes, nothing else."""


@dataclass
class Viewer:
    """The viewer block of a report.

    Attributes:
        title: Heading.
        cases: One entry per case (see :class:`medanomaly.outputs.viewer.ViewerVolumes`);
            file paths are relative to :data:`VIEWER_DIR`.
        threshold: The run's cut-off (score > threshold is flagged); the threshold slider
            starts there.
        note: A line under the heading.
    """

    title: str
    cases: Sequence[dict[str, Any]] = field(default_factory=list)
    threshold: float = math.nan
    note: str = ""


def ordered(cases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flagged cases first, each group by score, highest first (then by input order)."""
    return sorted(cases, key=lambda c: (not c["flagged"], -c["score"], c["index"]))


def install_static(folder: str | Path) -> Path:
    """Copy the viewer's scripts, NiiVue's licence and version into a report's ``viewer/``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in STATIC_FILES:
        shutil.copyfile(STATIC / name, folder / name)
    return folder


def start_threshold(cases: Sequence[dict[str, Any]], threshold: float) -> tuple[float, str]:
    """Where the threshold slider starts, and why.

    At the run's cut-off when some map reaches it (a score that is a percentile or a mean of
    the map lies on the map's scale); else (a score on another scale, e.g. a summed loss) at
    half the largest map value, and the note says so.
    """
    top = max((c["map_max"] for c in cases), default=0.0)
    if math.isfinite(threshold) and threshold <= top:
        return threshold, "The threshold slider starts at the run's cut-off."
    return top / 2, (
        f"The run's cut-off ({threshold:.4g}) lies above every map value (its score is not on "
        "the map's scale): the slider starts at half the largest map value."
    )


def _number(value: float) -> str:
    return "" if not math.isfinite(value) else repr(float(value))


def viewer_html(block: Viewer) -> str:
    """The viewer section: the case list, the controls, the canvas and the case data."""
    if not block.cases:
        return ""
    cases = ordered(block.cases)
    names = unique_names([c["id"] for c in cases])
    cases = [{**c, "name": name} for c, name in zip(cases, names, strict=True)]
    start, why = start_threshold(cases, block.threshold)
    low = min(0.0, min(c["map_min"] for c in cases))
    high = max(c["map_max"] for c in cases)
    top = high + 0.01 * max(high - low, 1e-6)  # above every map: the slider can clear them
    rows = "\n".join(
        f"<tr data-k='{k}' tabindex='0' class='{'abnormal' if c['flagged'] else ''}'>"
        f"<td>{k + 1}</td><td class='t'>{html.escape(c['name'])}</td><td>{c['score']:.4g}</td>"
        f"<td class='t label'>{'flagged' if c['flagged'] else ''}</td>"
        f"<td>{'' if c['label'] == -1 else c['label']}</td></tr>"
        for k, c in enumerate(cases)
    )
    data = json.dumps(cases).replace("</", "<\\/")
    note = f"<p class='sub'>{html.escape(block.note)} {html.escape(why)}</p>"
    return f"""<h2>{html.escape(block.title)}</h2>{note}
<div id='mv' class='mv' data-threshold='{_number(block.threshold)}' data-start='{start!r}'
 data-low='{low!r}' data-high='{top!r}' data-state='offline'>
<p id='mv-offline' class='mv-offline'>The viewer reads each case's volumes from
<code>{VIEWER_DIR}/</code>, which browsers refuse from a <code>file://</code> page: run
<code>medanomaly view FOLDER</code> on this report's folder and open the address it prints.</p>
<div class='mv-layout'>
<div class='mv-list scroll'><table class='plain'><thead><tr><th>#</th><th class='t'>case</th>
<th>score</th><th class='t'>flag</th><th>label</th></tr></thead><tbody>
{rows}
</tbody></table></div>
<div class='mv-panel'>
<div id='mv-facts' class='mv-facts'></div>
<div class='mv-controls'>
<label>colour map <select id='mv-colormap'><option>warm</option><option>hot</option>
<option>red</option><option>plasma</option><option>viridis</option><option>jet</option>
</select></label>
<label>opacity <input id='mv-opacity' type='range' min='0' max='1' step='0.05' value='0.7'>
</label>
<label>threshold <input id='mv-threshold' type='range' min='{low!r}' max='{top!r}'
 step='any' value='{start!r}'> <output id='mv-threshold-value'>{start:.4g}
</output></label>
<label id='mv-planes-label'>planes <select id='mv-planes'><option value='multi'>three planes
</option><option value='axial'>axial</option><option value='coronal'>coronal</option>
<option value='sagittal'>sagittal</option></select></label>
</div>
<div class='mv-canvas'><canvas id='mv-canvas'></canvas></div>
<p class='sub'>Mouse wheel over a plane: scroll its slices; click: move the cross.
Green outline: the label mask.</p>
</div></div></div>
<script type='application/json' id='mv-cases'>{data}</script>
<script src='{VIEWER_DIR}/viewer.js'></script>"""


VIEWER_STYLE = """
.mv-layout { display: flex; gap: 1em; align-items: flex-start; flex-wrap: wrap; }
.mv-list { max-height: 36em; }
.mv-list tr { cursor: pointer; }
.mv-list tr.open td { background: #dde8ff; }
.mv-panel { flex: 1; min-width: 480px; }
.mv-controls { display: flex; gap: 1em; flex-wrap: wrap; margin: 0.4em 0; font-size: 0.9em; }
.mv-canvas { width: 720px; height: 540px; max-width: 100%; position: relative; }
#mv-canvas { background: #000; }
.mv-facts { font-size: 0.9em; }
.mv-offline { background: #fff6d6; padding: 0.5em; border: 1px solid #e6d28a; }
.mv[data-state='offline'] .mv-layout { opacity: 0.6; }
"""
