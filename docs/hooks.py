"""MkDocs hook: one API reference page per module of ``medanomaly.models``.

A new model file gets its page (and its place under "API reference > Models") with nothing
to edit here or in ``mkdocs.yml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

MODELS = Path(__file__).resolve().parents[1] / "src" / "medanomaly" / "models"
FOLDER = "reference/models"


def _modules() -> list[str]:
    return sorted(p.stem for p in MODELS.glob("*.py") if not p.stem.startswith("_"))


def on_config(config: Any) -> Any:
    """Fill the empty ``Models`` entry of the API reference with the generated pages."""
    for section in config["nav"]:
        for entry in section.get("API reference", []) if isinstance(section, dict) else []:
            if isinstance(entry, dict) and "Models" in entry:
                entry["Models"] = [{module: f"{FOLDER}/{module}.md"} for module in _modules()]
    return config


def on_files(files: Files, config: Any) -> Files:
    """Add ``reference/models/<module>.md``: the module's docstrings, rendered by mkdocstrings."""
    for module in _modules():
        name = f"medanomaly.models.{module}"
        content = f"# {name}\n\n::: {name}\n    options:\n      show_root_heading: false\n"
        files.append(File.generated(config, f"{FOLDER}/{module}.md", content=content))
    return files
