"""The score ensemble: standardisation, config handling, persistence and resume."""

from __future__ import annotations

import numpy as np
import pytest

from medanomaly import BaseDetector, get_model
from medanomaly.config import build_detector
from medanomaly.errors import ConfigError

MEMBERS = [{"name": "cae"}, {"name": "cae", "residual": "ssim", "engine": {"seed": 1}}]


@pytest.fixture(scope="module")
def fitted(tiny2d, tiny2d_unseen, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ensemble")
    engine = {"epochs": 3, "batch_size": 8, "progress": False}
    detector = get_model("ensemble", members=MEMBERS, engine=engine)
    return detector.fit(tiny2d.normal, val=tiny2d_unseen, run_dir=run_dir), run_dir


def test_score_is_the_mean_of_the_members_standardised_scores(fitted, tiny2d, tiny2d_unseen):
    detector, _ = fitted
    z = []
    for member, (mean, sd) in zip(detector.members_, detector.score_stats_, strict=True):
        normal_scores = member.score(tiny2d_unseen.normal)  # the held-out normals
        assert mean == pytest.approx(normal_scores.mean())
        assert sd == pytest.approx(normal_scores.std(ddof=1))
        z.append((member.score(tiny2d) - mean) / sd)
    np.testing.assert_allclose(detector.score(tiny2d), np.mean(z, axis=0), rtol=1e-6)
    assert detector.val_scores_.mean() == pytest.approx(0.0, abs=1e-9)


def test_members_inherit_the_shared_engine_and_keep_their_overrides(fitted):
    detector, _ = fitted
    first, second = detector.members_
    assert first.engine_config.seed == 0 and second.engine_config.seed == 1
    assert second.engine_config.epochs == 3
    assert second.residual == "ssim"


def test_each_member_keeps_its_run_and_resume_loads_finished_members(fitted, tiny2d, tiny2d_unseen):
    detector, run_dir = fitted
    assert (run_dir / "member_1_cae" / "model.safetensors").exists()
    assert (run_dir / "member_2_cae" / "model.safetensors").exists()
    again = get_model("ensemble", members=MEMBERS, engine=detector.engine)
    again.fit(tiny2d.normal, val=tiny2d_unseen, run_dir=run_dir, resume=True)
    np.testing.assert_allclose(again.score(tiny2d), detector.score(tiny2d), rtol=1e-6)
    loaded = BaseDetector.load(run_dir)
    np.testing.assert_allclose(loaded.score(tiny2d), detector.score(tiny2d), rtol=1e-6)
    assert loaded.config()["model"]["members"] == MEMBERS


def test_config_errors_name_the_member():
    config = {"model": {"name": "ensemble", "members": [{"name": "cea"}]}}
    with pytest.raises(ConfigError, match="Did you mean 'cae'"):
        build_detector(config).fit(np.zeros((4, 1, 32, 32), np.float32))
    config = {"model": {"name": "ensemble", "members": [{"name": "cae", "latent": 3}]}}
    with pytest.raises(ConfigError, match="ensemble member 'cae'"):
        build_detector(config).fit(np.zeros((4, 1, 32, 32), np.float32))
    with pytest.raises(ConfigError, match="no 'name'"):
        get_model("ensemble", members=[{"residual": "abs"}]).member_blocks()
