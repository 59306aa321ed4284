"""``medanomaly models [NAME]``: a table that fits, and one model's arguments and configs."""

from __future__ import annotations

import pytest

from medanomaly.cli import main
from medanomaly.detectors.describe import arguments, models_table, plain
from medanomaly.detectors.registry import list_models


def test_the_table_fits_and_shows_no_markup() -> None:
    lines = models_table(list_models(), width=100).splitlines()
    assert len(lines) == len(list_models())
    assert all(len(line) <= 100 and ":class:" not in line and "``" not in line for line in lines)
    summaries = {line[: line.index(" ")]: line for line in lines}
    column = {line.index(line.split()[1]) for line in lines}
    assert len(column) == 1 and set(summaries) == set(list_models())  # one aligned column


def test_models_name_prints_arguments_defaults_and_configs(capsys) -> None:
    assert main(["models", "cae"]) == 0
    out = capsys.readouterr().out
    assert "latent_channels: int, default 16" in out
    assert "channels: a list of int, default (32, 64, 128, 256)" in out
    assert "input: 2D or 3D" in out and "cae_head_ct_2d" in out


def test_every_argument_of_every_model_is_described() -> None:
    for name in list_models():
        missing = [a.name for a in arguments(name) if not a.description]
        assert missing == [], f"{name}: arguments without a description: {missing}"


def test_an_unknown_model_exits_2_with_a_suggestion(capsys) -> None:
    assert main(["models", "ca"]) == 2
    assert "Did you mean 'cae'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [(":class:`~medanomaly.detectors.scoring.MapScoring`", "MapScoring"), ("``abs``", "abs")],
)
def test_markup_is_removed(text: str, expected: str) -> None:
    assert plain(text) == expected
