"""``medanomaly inspect``: what the readers see, and the exit code when nothing can be read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medanomaly.cli import build_parser, main
from medanomaly.data.phantoms import write_dicom_slice

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data_path(relative: str) -> Path:
    """``../shared/data/<relative>``; skips the test, naming the folder, when it is absent."""
    path = DATA_ROOT / relative
    if not path.exists():
        pytest.skip(f"real data not found: {path} (needs ../shared/data beside the repo)")
    return path


def write_slice(path: Path, z: float, series_uid: str) -> None:
    """One 4x6 axial CT slice, 0.5 x 0.8 mm pixels, stored values 1000 + z, intercept -1024."""
    pixels = np.full((4, 6), 1000 + int(z))
    write_dicom_slice(
        path,
        pixels,
        (0.0, 0.0, z),
        pixel_spacing=(0.5, 0.8),
        thickness=2.5,
        series_uid=series_uid,
        description=f"series {series_uid}",
    )


def write_series(folder: Path, zs: list[float], series_uid: str = "1.2.3.1") -> Path:
    for i, z in enumerate(zs):
        write_slice(folder / f"{series_uid}_{i}.dcm", z, series_uid)
    return folder


def inspect(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["inspect", *args])
    return code, capsys.readouterr().out


def test_inspect_is_a_command() -> None:
    args = build_parser().parse_args(["inspect", "x", "--series-uid", "1.2"])
    assert (args.path, args.series_uid) == (["x"], "1.2")


def test_inspect_dicom_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = inspect(capsys, str(write_series(tmp_path, [0.0, 2.5, 5.0, 10.0])))
    assert code == 0
    assert "shape (C, X, Y, Z): (1, 6, 4, 4)" in out
    assert "spacing (mm): (0.8, 0.5, 2.5)" in out
    assert "orientation: file LPS -> returned RAS" in out
    assert "intensity range: -24 .. -14 HU" in out
    assert "gap of 5.0 mm" in out  # the missing slice is a problem, not a failure


def test_inspect_several_series_lists_them_and_reads_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_series(tmp_path, [0.0, 2.5], "1.2.3.1")
    write_series(tmp_path, [0.0, 2.5, 5.0], "1.2.3.2")
    code, out = inspect(capsys, str(tmp_path))
    assert code == 0
    assert "DICOM series found: 2" in out and "1.2.3.2  CT  3 slices" in out
    assert "pass series_uid" in out
    code, out = inspect(capsys, str(tmp_path), "--series-uid", "1.2.3.2")
    assert code == 0 and "shape (C, X, Y, Z): (1, 6, 4, 3)" in out


@pytest.mark.parametrize("kind", ["missing", "corrupt", "text", "empty folder", "wrong uid"])
def test_inspect_exits_non_zero_when_nothing_can_be_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    args = {
        "missing": [str(tmp_path / "missing.nii.gz")],
        "corrupt": [str(tmp_path / "corrupt.png")],
        "text": [str(tmp_path / "notes.txt")],
        "empty folder": [str(tmp_path / "empty")],
        "wrong uid": [str(tmp_path / "series"), "--series-uid", "9.9"],
    }[kind]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "empty").mkdir()
    write_series(tmp_path / "series", [0.0, 2.5])
    code, out = inspect(capsys, *args)
    assert code == 1
    refusal = next(line for line in out.splitlines() if line.startswith("cannot read: "))
    assert out.startswith(f"path: {args[0]}\n")
    assert args[0] not in refusal  # the file is named once, on the path line


@pytest.mark.realdata
def test_inspect_real_head_ct(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = inspect(capsys, str(data_path("dicom_head_ct")))
    assert code == 0
    assert "shape (C, X, Y, Z): (1, 512, 512, 123)" in out
    assert "spacing (mm): (1.0, 1.0, 2.0)" in out
    assert "intensity range: -1024 .. " in out and " HU (rescale slope 1" in out
