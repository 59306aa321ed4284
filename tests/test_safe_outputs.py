"""Model files that cannot run code; outputs that are never lost, mixed or rescored; exit codes."""

from __future__ import annotations

import csv
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medanomaly import BaseDetector, get_model
from medanomaly.cli import main
from medanomaly.data.phantoms import make_phantoms
from medanomaly.io.safe_files import UnsafeFileError, load_state, save_state

SRC = Path(__file__).resolve().parents[1] / "src"


class _Payload:
    """Unpickling this calls ``Path.touch`` on ``target``: what a malicious model.pt does."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _write_pngs(folder: Path, images: np.ndarray, prefix: str = "case") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray((image[0] * 255).astype(np.uint8)).save(folder / f"{prefix}_{i:03d}.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny CAE runs (``run_a``, ``run_b``) and a folder of PNGs to score."""
    root = tmp_path_factory.mktemp("safe")
    _write_pngs(root / "train", make_phantoms(12, 0, (32, 32), seed=1).images)
    _write_pngs(root / "data", make_phantoms(3, 3, (32, 32), seed=2).images)
    for name, seed in (("run_a", 0), ("run_b", 1)):
        config = {
            "model": {"name": "cae", "channels": [4, 8], "latent_channels": 2},
            "engine": {"epochs": 1, "batch_size": 4, "progress": False, "seed": seed},
            "data": {"transforms": [{"min_max": {}}]},
        }
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
        fit = ["fit", "--config", str(root / f"{name}.yaml"), "--data", str(root / "train")]
        assert main([*fit, "--out", str(root / name)]) == 0
    return root


def _score(runs: Path, run: str, out: Path, maps: Path | None = None, data: Path | None = None):
    args = ["score", "--run", str(runs / run), "--data", str(data or runs / "data")]
    args += ["--out", str(out)] + (["--maps", str(maps)] if maps else [])
    return main(args)


def _ids(path: Path) -> list[str]:
    return [row["id"] for row in csv.DictReader(path.open())]


# ------------------------------------------------------------------------ model files


def test_a_pickle_payload_is_refused_without_running(runs: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "pwned"
    evil = tmp_path / "evil_run"
    evil.mkdir()
    with open(evil / "model.pt", "wb") as handle:
        pickle.dump({"model": _Payload(target)}, handle)
    (evil / "model.safetensors").write_bytes((evil / "model.pt").read_bytes())  # renamed too
    for path in (evil / "model.pt", evil / "model.safetensors", evil):
        with pytest.raises(UnsafeFileError, match="refused"):
            BaseDetector.load(path)
    capsys.readouterr()
    code = main(["score", "--run", str(evil / "model.pt"), "--data", str(runs / "data"),
                 "--out", str(tmp_path / "s.csv")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model.pt: not a medanomaly safetensors file" in err[0]
    assert not target.exists() and not (tmp_path / "s.csv").exists()


def test_a_trusted_legacy_pickle_still_loads(runs: Path, tmp_path: Path) -> None:
    detector = BaseDetector.load(runs / "run_a")
    torch.save(detector.saved_state(), tmp_path / "model.pt")  # how runs were saved before
    with pytest.raises(UnsafeFileError):
        BaseDetector.load(tmp_path)
    legacy = BaseDetector.load(tmp_path, trust_pickle=True)
    images = make_phantoms(2, 2, (32, 32), seed=3).images
    np.testing.assert_allclose(legacy.score(images), detector.score(images), rtol=1e-6)


def test_state_round_trips_through_safetensors(tmp_path: Path) -> None:
    state = {
        "weights": {"conv.weight": torch.randn(2, 3), "step": torch.tensor(4)},
        "array": np.arange(6, dtype=np.float32).reshape(2, 3),
        "names": np.array(["a", "bc"]),
        "betas": (0.9, 0.999),
        "by_index": {0: {"lr": 1e-3}, 1: None},
        "history": [{"loss": float("nan")}],
        "scalar": np.float64(2.5),
    }
    save_state(state, tmp_path / "state.safetensors")
    back = load_state(tmp_path / "state.safetensors")
    torch.testing.assert_close(back["weights"]["conv.weight"], state["weights"]["conv.weight"])
    np.testing.assert_array_equal(back["array"], state["array"])
    assert back["names"].tolist() == ["a", "bc"] and back["betas"] == (0.9, 0.999)
    assert back["by_index"] == {0: {"lr": 1e-3}, 1: None} and back["scalar"] == 2.5
    assert np.isnan(back["history"][0]["loss"])
    with pytest.raises(TypeError, match="object"):
        save_state({"bad": object()}, tmp_path / "bad.safetensors")


def test_latent_density_mixture_is_saved_without_pickle(tiny2d, tmp_path: Path) -> None:
    engine = {"epochs": 1, "batch_size": 8, "progress": False, "seed": 0}
    detector = get_model("latent_density", density="gmm", components=2, engine=engine)
    detector.fit(tiny2d.normal).save(tmp_path / "model.safetensors")
    loaded = BaseDetector.load(tmp_path)
    np.testing.assert_allclose(loaded.score(tiny2d), detector.score(tiny2d), rtol=1e-5)


# ------------------------------------------------------------------------ outputs


def test_fit_into_an_existing_run_refuses_without_overwrite(runs: Path, capsys) -> None:
    fit = ["fit", "--config", str(runs / "run_b.yaml"), "--data", str(runs / "train")]
    before = (runs / "run_a" / "model.safetensors").read_bytes()
    assert main([*fit, "--out", str(runs / "run_a")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (runs / "run_a" / "model.safetensors").read_bytes() == before


def test_a_second_writer_of_the_same_output_exits_2(runs: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "scores.csv"
    holder = subprocess.Popen(  # another process holding the output, as a running score does
        [sys.executable, "-c", "import sys, time; from medanomaly.outputs.guard import "
         "claim_outputs; c = claim_outputs([sys.argv[1]]); print('held', flush=True); "
         "time.sleep(60)", str(out)],
        env={**os.environ, "PYTHONPATH": str(SRC)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert _score(runs, "run_a", out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another medanomaly command is writing here" in err[0]
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert _score(runs, "run_a", out) == 0  # the lock went with the process


_SLOW_SCORE = """
import sys, time
import medanomaly.jobs.score as job
write = job.save_part_maps
def slow(*args, **kwargs):
    written = write(*args, **kwargs)
    print("wrote", flush=True)
    time.sleep(60)
    return written
job.save_part_maps = slow
from medanomaly.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_score_leaves_nothing_in_the_rerun(runs: Path, tmp_path: Path) -> None:
    out, maps = tmp_path / "scores.csv", tmp_path / "maps"
    assert _score(runs, "run_a", out, maps) == 0
    old = {p.name for p in maps.iterdir()}
    args = ["score", "--run", str(runs / "run_a"), "--data", str(runs / "data"),
            "--out", str(out), "--maps", str(maps)]  # fmt: skip
    killed = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SCORE, *args, "--num-workers", "0"],
        env={**os.environ, "PYTHONPATH": str(SRC)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert killed.stdout.readline().strip() == "wrote"  # mid-way through the maps
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert (tmp_path / ".maps.partial").is_dir()  # what kill -9 leaves
    assert _score(runs, "run_b", out, maps) == 0
    assert {p.name for p in maps.iterdir()} == old  # same stems, all rewritten by run_b
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".partial", ".old"))]
    assert leftovers == []
    sidecars = [yaml.safe_load(p.read_text()) for p in maps.glob("*_map.json")]
    assert len(sidecars) == 6 and all(s["model"] == "cae" for s in sidecars)
    new_scores = sorted(round(s["score"], 5) for s in sidecars)
    assert new_scores == sorted(round(float(r["score"]), 5) for r in csv.DictReader(out.open()))


def test_maps_inside_the_data_are_not_scored_on_a_rerun(runs: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_pngs(data, make_phantoms(2, 1, (32, 32), seed=4).images)
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    assert _score(runs, "run_a", first, data / "maps", data=data) == 0
    assert _score(runs, "run_a", second, data / "maps", data=data) == 0
    assert _ids(first) == _ids(second) and len(_ids(second)) == 3
    assert _score(runs, "run_a", second, data, data=data) == 2  # maps onto the data: refused


def test_strict_stops_before_any_output(runs: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    _write_pngs(data, make_phantoms(2, 0, (32, 32), seed=5).images)
    (data / "broken.png").write_bytes(b"not a png")
    out, maps = tmp_path / "s.csv", tmp_path / "maps"
    args = ["--run", str(runs / "run_a"), "--data", str(data), "--strict"]
    assert main(["score", *args, "--out", str(out), "--maps", str(maps)]) == 2
    assert main(["screen", *args, "--out", str(tmp_path / "screen")]) == 2
    assert not out.exists() and not maps.exists()
    assert not (tmp_path / "screen" / "screen.csv").exists()
    assert "broken.png" in capsys.readouterr().err


# ------------------------------------------------------------------------ exit codes


@pytest.mark.parametrize("command", ["score", "evaluate", "screen"])
def test_a_missing_run_exits_2_with_one_line(command: str, runs: Path, tmp_path: Path, capsys):
    args = [command, "--run", str(tmp_path / "no_such_run"), "--data", str(runs / "data")]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_run" in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("model.channels=big", "channels must be a list of int, got 'big'"),
        ("model.latnet_channels=3", "Did you mean 'latent_channels'"),
    ],
)
def test_bad_model_arguments_exit_2_before_a_run_folder_exists(
    setting: str, expected: str, runs: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    args = ["--config", str(runs / "run_a.yaml"), "--data", str(runs / "train"), "--set", setting]
    assert main(["fit", *args, "--out", str(out)]) == 2
    assert main(["cv", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(expected in line for line in err)
    assert "Valid arguments" in err[0] or "must be" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["score", "--run", "r", "--data", "d", "--out", "o", "--devices", "0"],
        ["screen", "--run", "r", "--data", "d", "--out", "o", "--k", "-1"],
        ["cv", "--config", "c", "--data", "d", "--out", "o", "--folds", "1"],
    ],
)
def test_numbers_out_of_range_exit_2(args: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "below the minimum" in capsys.readouterr().err
