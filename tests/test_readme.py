"""The README's quick start runs as shown, and the README stays a guide."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SHELL_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
INSTALLED_BIN = os.environ.get("MEDANOMALY_INSTALLED_BIN")
"""The bin folder of a fresh venv holding the built wheel (set by .ci/installed.sh in CI)."""


def _phantom_blocks() -> list[str]:
    """The shell blocks that start from the phantom scans of ``medanomaly demo --scans``."""
    return [block for block in SHELL_BLOCKS if "demo --scans" in block]


def test_readme_is_a_guide():
    assert len(README.splitlines()) <= 250
    assert "seed 00" not in README.lower()
    assert _phantom_blocks(), "the quick start must run on the phantom scans"


@pytest.mark.slow
def test_quick_start_runs_as_shown(tmp_path):
    """Every command of the quick start, verbatim but for where the venv lives, run from a
    folder outside the repository. In CI the venv is a fresh one with the wheel installed, not
    this editable checkout (``.ci/installed.sh`` sets ``MEDANOMALY_INSTALLED_BIN``)."""
    assert ROOT not in tmp_path.resolve().parents
    bin_dir = Path(INSTALLED_BIN) if INSTALLED_BIN else Path(sys.executable).parent
    script = "\n".join(_phantom_blocks()).replace(".venv/bin/", f"{bin_dir}/")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert list((tmp_path / "maps").glob("*_map.nii.gz")), "no maps in the scans' geometry"
    assert (tmp_path / "eval" / "report.html").exists()
    assert list((tmp_path / "eval" / "viewer" / "cases").glob("*_map.nii.gz"))
    by_run = (tmp_path / "scores.csv").read_text().splitlines()
    by_export = (tmp_path / "s.csv").read_text().splitlines()
    flags = [[row.split(",")[3] for row in rows[1:]] for rows in (by_run, by_export)]
    assert flags[0] == flags[1] and len(flags[0]) == 12, "the export flags otherwise"
