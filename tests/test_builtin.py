"""Built-in configs and specs: package data found by name, a file winning over a name."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

import medanomaly
from medanomaly import builtin
from medanomaly.cli import main
from medanomaly.config import load_config
from medanomaly.errors import MissingFileError
from medanomaly.model_selection.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
INTENSITY = {"model": {"name": "intensity", "spatial_dims": 2}}


@pytest.mark.parametrize("kind", ["config", "spec"])
def test_every_builtin_file_opens_with_a_one_line_description(kind):
    assert len(builtin.names(kind)) >= 10
    for name in builtin.names(kind):
        lines = builtin.builtin(kind, name).read_text().splitlines()
        assert lines[0].startswith("# ") and len(lines[0]) <= 100, name
        assert lines[1] == "#", f"{name}: the description is one line, then '#'"
        assert builtin.description("\n".join(lines)) == lines[0][2:]


def test_config_list_prints_every_builtin_config_with_its_description(capsys):
    assert main(["config", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == builtin.names("config")
    first = builtin.describe_all("config")[0]
    assert out[0].endswith(first[1])
    assert main(["config", "list", "--specs"]) == 0
    assert "head_ct" in capsys.readouterr().out.split()


def test_config_show_writes_out_a_config_that_loads_back(tmp_path, capsys):
    assert main(["config", "show", "dae_lgg_2d"]) == 0
    text = capsys.readouterr().out
    assert text == builtin.builtin("config", "dae_lgg_2d").read_text()
    (tmp_path / "my.yaml").write_text(text)
    assert load_config(tmp_path / "my.yaml") == load_config("dae_lgg_2d")


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["fit", "--config", "dae_lgg2d", "--data", "x", "--out", "OUT"], "'dae_lgg_2d'"),
        (
            ["fit", "--config", "configs/dae_lgg_2d.yaml", "--data", "x", "--out", "OUT"],
            "'dae_lgg_2d'",
        ),
        (["compare", "--spec", "head_cct", "--out", "OUT"], "'head_ct'"),
        (["config", "show", "--spec", "lgg_pixels"], "'lgg_pixel'"),
    ],
)
def test_an_unknown_name_exits_2_with_one_line_and_the_closest_names(
    argv, hint, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Did you mean" in err and hint in err
    assert not (tmp_path / "OUT").exists()


def test_a_file_wins_over_a_builtin_name(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    Path("dae_lgg_2d").write_text(yaml.safe_dump(INTENSITY))
    with caplog.at_level(logging.INFO, logger="medanomaly.builtin"):
        assert load_config("dae_lgg_2d")["model"]["name"] == "intensity"
    assert "wins over the built-in config 'dae_lgg_2d'" in caplog.text


def test_name_dot_yaml_beside_does_not_replace_the_builtin_and_a_warning_says_so(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    Path("dae_lgg_2d.yaml").write_text(yaml.safe_dump(INTENSITY))
    with caplog.at_level(logging.WARNING, logger="medanomaly.builtin"):
        assert load_config("dae_lgg_2d")["model"]["name"] == "dae"
    assert "dae_lgg_2d.yaml here is read only when named as a path" in caplog.text
    assert load_config("dae_lgg_2d.yaml")["model"]["name"] == "intensity"


def test_a_folder_named_like_a_config_is_refused():
    with pytest.raises(MissingFileError, match="is not a config file"):
        builtin.resolve("config", ROOT / "src")


def test_a_builtin_spec_reads_its_data_from_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec("head_ct_quick")
    assert spec.data == Path("runs/head_ct/manifest.csv")
    assert spec.candidate("dae").config["model"]["name"] == "dae"  # a built-in config by name
    assert load_spec("head_ct_quick", data="mine.csv").data == Path("mine.csv")


def test_compare_names_where_a_builtin_spec_looks_for_its_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--spec", "lgg_intensity", "--out", "OUT"]) == 2
    err = capsys.readouterr().err
    assert "runs/lgg/manifest.csv: no such data folder or manifest" in err
    assert "relative to the current folder" in err and "config show --spec lgg_intensity" in err
    assert not (tmp_path / "OUT").exists()


def test_a_spec_file_finds_configs_beside_it_and_builtin_ones_by_name(tmp_path, monkeypatch):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "mine.yaml").write_text(yaml.safe_dump(INTENSITY))
    (folder / "data.csv").write_text("path,label\n")
    spec = {
        "data": {"path": "data.csv"},
        "candidates": {"mine": {"config": "mine.yaml"}, "dae": {"config": "dae_head_ct_2d"}},
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    loaded = load_spec("study/spec.yaml")
    assert loaded.data == folder.resolve() / "data.csv"
    assert loaded.candidate("mine").config["model"]["name"] == "intensity"
    assert loaded.candidate("dae").config["model"]["name"] == "dae"


def test_the_version_has_one_home():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "medanomaly._version.__version__"


def test_python_m_medanomaly_and_verbose_says_which_file_it_read(tmp_path):
    (tmp_path / "cae_head_ct_2d").write_text(yaml.safe_dump(INTENSITY))
    run = [sys.executable, "-m", "medanomaly"]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip().endswith(medanomaly.__version__)
    argv = ["-v", "fit", "--config", "cae_head_ct_2d", "--data", "none.csv", "--out", "OUT"]
    done = subprocess.run(
        [*run, *argv], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "the file cae_head_ct_2d wins over the built-in config 'cae_head_ct_2d'" in done.stderr
    assert "none.csv: no such manifest" in done.stderr
