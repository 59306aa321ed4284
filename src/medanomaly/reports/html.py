"""One self-contained HTML report per evaluation.

The report is a single file: figures are inlined as base64 ``data:`` URIs, the style sheet
and the few lines of JavaScript that sort the tables are inline, and a Content-Security-Policy
forbids loading anything from elsewhere, so it reads the same offline, attached to an e-mail
or archived next to ``metrics.json``.

A report is a list of blocks, drawn in order: :class:`Facts` (a key/value list),
:class:`Table` (sortable by clicking a header), :class:`Figures` (a grid of PNGs),
:class:`Text` (a paragraph) and :class:`~medanomaly.reports.viewer.Viewer` (the scans with
their maps in NiiVue). A report with a viewer also loads ``viewer/*.js`` and each case's
volumes from its own folder when served (``medanomaly view``); its policy still forbids
anything from elsewhere.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medanomaly._version import __version__
from medanomaly.io.atomic import atomic_write_text
from medanomaly.reports.viewer import VIEWER_CSP, VIEWER_STYLE, Viewer, viewer_html

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
.sub { color: #666; margin-top: 0; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1.2em; }
dl.facts dt { font-weight: 600; }
dl.facts dd { margin: 0; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
td.t, th.t { text-align: left; }
thead th { background: #f3f3f3; position: sticky; top: 0; }
table.sortable thead th { cursor: pointer; user-select: none; }
table.sortable thead th::after { content: " \\2195"; color: #aaa; }
table.sortable thead th[aria-sort="ascending"]::after { content: " \\2191"; color: #222; }
table.sortable thead th[aria-sort="descending"]::after { content: " \\2193"; color: #222; }
tbody tr:nth-child(even) { background: #fafafa; }
tr.abnormal td.label { color: #b00; font-weight: 600; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; max-width: 100%; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; max-width: 60ch; }
img.broken { outline: 3px solid red; }
.scroll { max-height: 40em; overflow: auto; display: inline-block; }
footer { margin-top: 2em; color: #888; font-size: 0.8em; }
"""

# Click a header of a .sortable table to sort by that column (again to reverse). Cells carry
# their raw value in data-v; numbers sort numerically, text alphabetically, blanks last.
# After load, every <img> is checked; one that failed is outlined and logged.
_SCRIPT = """
(function () {
  "use strict";
  function cellKey(cell) {
    var raw = cell.getAttribute("data-v");
    if (raw === null) { raw = cell.textContent; }
    raw = raw.trim();
    if (raw === "") { return { kind: 2, v: 0 }; }
    var num = Number(raw);
    return isNaN(num) ? { kind: 1, v: raw.toLowerCase() } : { kind: 0, v: num };
  }
  function compare(a, b) {
    if (a.kind !== b.kind) { return a.kind - b.kind; }
    return a.v < b.v ? -1 : (a.v > b.v ? 1 : 0);
  }
  function sortBy(table, col, header) {
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (row, i) {
      return { row: row, key: cellKey(row.cells[col]), i: i };
    });
    keyed.sort(function (a, b) {
      var blankA = a.key.kind === 2, blankB = b.key.kind === 2;
      if (blankA !== blankB) { return blankA ? 1 : -1; }
      var c = compare(a.key, b.key);
      return (ascending ? c : -c) || a.i - b.i;
    });
    keyed.forEach(function (item) { body.appendChild(item.row); });
    Array.prototype.forEach.call(header.parentNode.cells, function (th) {
      th.removeAttribute("aria-sort");
    });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (header, col) {
      header.tabIndex = 0;
      header.title = "click to sort";
      header.addEventListener("click", function () { sortBy(table, col, header); });
      header.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          sortBy(table, col, header);
        }
      });
    });
  });
  window.addEventListener("load", function () {
    var images = document.images, shown = 0;
    Array.prototype.forEach.call(images, function (img) {
      if (img.complete && img.naturalWidth > 0) { shown += 1; return; }
      img.classList.add("broken");
      console.error("figure failed to load: " + img.alt);
    });
    document.body.setAttribute("data-figures-shown", shown + "/" + images.length);
  });
})();
"""


@dataclass
class Facts:
    """A titled key/value list (e.g. the headline metrics)."""

    title: str
    items: Sequence[tuple[str, Any]]


@dataclass
class Table:
    """A titled table; ``sortable`` tables sort when a header is clicked.

    Attributes:
        title: Heading above the table.
        columns: Column names.
        rows: One sequence of cell values per row (numbers, strings or ``None``).
        sortable: Attach the click-to-sort behaviour.
        note: A line of text under the heading.
        row_classes: Optional CSS class per row (``"abnormal"`` highlights the label cell).
    """

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    sortable: bool = True
    note: str = ""
    row_classes: Sequence[str] | None = None


@dataclass
class Figure:
    """One PNG file to inline, with a caption."""

    path: Path
    title: str
    caption: str = ""


@dataclass
class Figures:
    """A titled grid of figures (missing files are left out)."""

    title: str
    figures: Sequence[Figure] = field(default_factory=list)
    note: str = ""


@dataclass
class Text:
    """A titled paragraph of plain text."""

    title: str
    text: str


Block = Facts | Table | Figures | Text | Viewer


def format_value(value: Any) -> str:
    """How a cell value is shown: 4 significant digits for floats, ``n/a`` for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _raw(value: Any) -> str:
    """The sort key of a cell (full precision for numbers, empty for missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def data_uri(path: str | Path) -> str:
    """A ``data:image/png;base64,...`` URI of a PNG file."""
    encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"data:image/png;base64,{encoded}"


def _facts_html(block: Facts) -> str:
    items = "".join(
        f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(format_value(v))}</dd>"
        for k, v in block.items
    )
    return f"<h2>{html.escape(block.title)}</h2>\n<dl class='facts'>{items}</dl>"


def _cell(value: Any, column: str) -> str:
    text = isinstance(value, str)
    classes = [c for c in ("t" if text else "", "label" if column == "label" else "") if c]
    cls = f" class='{' '.join(classes)}'" if classes else ""
    raw = html.escape(_raw(value), quote=True)
    return f"<td{cls} data-v='{raw}'>{html.escape(format_value(value))}</td>"


def _table_html(block: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in block.columns)
    classes = block.row_classes or [""] * len(block.rows)
    body = "\n".join(
        f"<tr class='{html.escape(cls)}'>"
        + "".join(_cell(v, c) for v, c in zip(row, block.columns, strict=True))
        + "</tr>"
        for row, cls in zip(block.rows, classes, strict=True)
    )
    kind = "sortable" if block.sortable else "plain"
    note = f"<p class='sub'>{html.escape(block.note)}</p>" if block.note else ""
    return (
        f"<h2>{html.escape(block.title)}</h2>{note}\n<div class='scroll'>"
        f"<table class='{kind}'><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>"
        "</table></div>"
    )


def _figures_html(block: Figures) -> str:
    shown = [f for f in block.figures if f.path is not None and Path(f.path).is_file()]
    if not shown:
        return ""
    cells = "\n".join(
        f"<figure><img src='{data_uri(f.path)}' alt='{html.escape(f.title, quote=True)}'>"
        f"<figcaption><b>{html.escape(f.title)}</b>"
        f"{'. ' + html.escape(f.caption) if f.caption else ''}</figcaption></figure>"
        for f in shown
    )
    note = f"<p class='sub'>{html.escape(block.note)}</p>" if block.note else ""
    return f"<h2>{html.escape(block.title)}</h2>{note}\n<div class='grid'>\n{cells}\n</div>"


def _text_html(block: Text) -> str:
    return f"<h2>{html.escape(block.title)}</h2>\n<p>{html.escape(block.text)}</p>"


_RENDERERS = {
    Facts: _facts_html,
    Table: _table_html,
    Figures: _figures_html,
    Text: _text_html,
    Viewer: viewer_html,
}


def render_report(title: str, blocks: Sequence[Block], subtitle: str = "") -> str:
    """The complete HTML document.

    Args:
        title: Page title and main heading.
        blocks: What the page shows, in order.
        subtitle: A line under the heading (e.g. the run and data paths).

    Returns:
        The HTML text (UTF-8, no external resources).
    """
    body = "\n".join(_RENDERERS[type(b)](b) for b in blocks)
    viewer = any(isinstance(b, Viewer) and b.cases for b in blocks)
    policy, style = (VIEWER_CSP, _STYLE + VIEWER_STYLE) if viewer else (_CSP, _STYLE)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: UP017
    sub = f"<p class='sub'>{html.escape(subtitle)}</p>" if subtitle else ""
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<meta http-equiv='Content-Security-Policy' content=\"{policy}\">\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        f"<title>{html.escape(title)}</title>\n<style>{style}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>{sub}\n{body}\n"
        f"<footer>medanomaly {html.escape(__version__)}, written {stamp}. "
        "Decision rule: a case is called abnormal iff its score &gt; threshold.</footer>\n"
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )


def write_report(path: str | Path, title: str, blocks: Sequence[Block], subtitle: str = "") -> Path:
    """Render the report and write it atomically.

    Args:
        path: Target ``.html`` file.
        title: Page title.
        blocks: What the page shows, in order.
        subtitle: A line under the heading.

    Returns:
        The path written.
    """
    atomic_write_text(path, render_report(title, blocks, subtitle))
    return Path(path)
