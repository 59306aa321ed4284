"""The first hour of ``compare``: a starter spec chosen by the data, and the shared flags."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_evaluate_cli import write_phantom_manifest

from medanomaly.cli import build_parser, main
from medanomaly.data.listing import list_cases
from medanomaly.errors import ConfigError
from medanomaly.model_selection.spec import parse_spec
from medanomaly.model_selection.starter import data_shape, starter_name, starter_spec


def test_compare_without_a_spec_runs_the_starter_for_2d_slices(tmp_path, capsys):
    torch.set_num_threads(1)
    manifest = write_phantom_manifest(tmp_path / "data", 40, 20, per_group=2)
    out = tmp_path / "out"
    args = ["compare", "--data", str(manifest), "--out", str(out), "--quiet"]
    assert main([*args, "--set", "engine.epochs=1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == {
        "intensity",
        "vae_map",
        "dae",
        "vae_map+intensity",
        "dae+intensity",
        "dae+vae_map",
    }
    assert results["protocol"]["level"] == "both"  # the manifest names lesion masks
    spec = json.loads((out / "spec.json").read_text())
    assert spec["candidates"]["dae"]["engine"]["epochs"] == 1  # --set reached every model
    assert spec["candidates"]["intensity"]["model"]["name"] == "intensity"
    assert f"chosen on validation: {results['chosen']}" in capsys.readouterr().out


def test_print_spec_writes_the_starter_with_the_data_and_it_parses(tmp_path, capsys):
    manifest = write_phantom_manifest(tmp_path / "data", 8, 4)
    assert main(["compare", "--data", str(manifest), "--print-spec"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# starter_2d: the starter spec medanomaly compare chose for")
    raw = yaml.safe_load(text)
    assert raw["data"]["path"] == str(manifest) and raw["level"] == "both"
    spec = parse_spec(raw, tmp_path)
    assert {c.name for c in spec.candidates if c.baseline} == {"intensity"}


def _rgb_folder(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        picture = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(picture).save(folder / f"photo_{i}.png")
    return folder


def _volume_folder(folder):
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), folder / "a.nii.gz")
    return folder


def test_the_starter_follows_the_dimensions_and_channels_of_the_data(tmp_path):
    rgb = _rgb_folder(tmp_path / "rgb")
    assert data_shape(list_cases(rgb), rgb) == (2, 3)
    assert starter_spec(rgb)[0] == "starter_rgb_2d"
    volumes = _volume_folder(tmp_path / "volumes")
    assert data_shape(list_cases(volumes), volumes) == (3, 1)
    assert starter_spec(volumes)[0] == "starter_3d"
    assert starter_name(2, 1) == "starter_2d"
    with pytest.raises(ConfigError, match="3D with 2 channels"):
        starter_name(3, 2)


def test_v_works_after_the_sub_command_and_help_points_at_the_spec_format(capsys):
    args = build_parser().parse_args(["compare", "--data", "d", "--print-spec", "-v"])
    assert args.verbose is True
    assert build_parser().parse_args(["compare", "--data", "d"]).verbose is False
    assert build_parser().parse_args(["-v", "compare", "--data", "d"]).verbose is True
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    help_text = capsys.readouterr().out
    assert "docs/compare.md" in help_text and "mean_sd:k=3" in help_text


def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys):
    manifest = write_phantom_manifest(tmp_path / "data", 8, 4)
    base = ["compare", "--data", str(manifest)]
    cases = [
        ([*base, "--out", str(tmp_path / "o"), "--devices", "2"], "this machine has 0"),
        ([*base, "--print-spec", "--set", "data.min_size=3"], "spec's data block"),
        ([*base], "give --out"),
        (["compare", "--out", str(tmp_path / "o")], "give --data"),
    ]
    if torch.cuda.device_count() >= 2:
        cases = cases[1:]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
