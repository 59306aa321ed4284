"""f-AnoGAN: gradient penalty, the frozen-GAN encoder stage, and resume across stages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medanomaly import get_model
from medanomaly.io.safe_files import load_state
from medanomaly.models.fanogan import FAnoGANNetwork, gradient_penalty
from medanomaly.training.engine import Engine, read_history


class LinearCritic(nn.Module):
    """D(x) = <w, x>: its input gradient is w everywhere."""

    def __init__(self, norm: float) -> None:
        super().__init__()
        w = torch.randn(16)
        self.w = nn.Parameter(w / w.norm() * norm)

    def forward(self, x, mode):
        assert mode == "critic"
        return x.flatten(1) @ self.w, None


@pytest.mark.parametrize(("norm", "expected"), [(1.0, 0.0), (2.0, 1.0), (0.5, 0.25)])
def test_gradient_penalty_is_squared_distance_of_gradient_norm_from_one(norm, expected):
    real, fake = torch.rand(8, 1, 4, 4), torch.rand(8, 1, 4, 4)
    penalty = gradient_penalty(LinearCritic(norm), real, fake)
    assert penalty.item() == pytest.approx(expected, abs=1e-5)


def test_gradient_penalty_has_a_gradient_for_the_critic():
    critic = LinearCritic(2.0)
    gradient_penalty(critic, torch.rand(4, 1, 4, 4), torch.rand(4, 1, 4, 4)).backward()
    assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0


@pytest.mark.parametrize("dims", [2, 3])
def test_network_modes(dims):
    net = FAnoGANNetwork(dims, [16] * dims, channels=(4, 8, 8, 8), latent_dim=6)
    x = torch.rand(2, 1, *[16] * dims)
    assert net(torch.randn(2, 6), "generate").shape == x.shape
    score, features = net(x, "critic")
    assert score.shape == (2,) and features.shape[0] == 2
    reconstruction, f_real, f_rec = net(x, "reconstruct")
    assert reconstruction.shape == x.shape and f_real.shape == f_rec.shape


def _gan_weights(state):
    return {k: v for k, v in state.items() if not k.startswith("encoder.")}


def test_encoder_stage_keeps_generator_and_critic_frozen(tmp_path, tiny2d):
    engine = {"epochs": 2, "batch_size": 4, "progress": False}
    detector = get_model("fanogan", channels=(4, 8, 8, 8), latent_dim=8, n_critic=2, engine=engine)
    detector.fit(tiny2d.normal, run_dir=tmp_path)
    after_gan = load_state(tmp_path / "checkpoint_gan.safetensors")["network"]
    final = detector.network_.state_dict()
    for key, value in _gan_weights(after_gan).items():
        torch.testing.assert_close(final[key].cpu(), value, rtol=0, atol=0, msg=key)
    changed = [
        k
        for k in final
        if k.startswith("encoder.") and not torch.equal(final[k].cpu(), after_gan[k])
    ]
    assert changed, "the encoder did not train"
    assert len(read_history(tmp_path, "gan")) == 2 and len(read_history(tmp_path)) == 2


def test_resume_in_the_encoder_stage_matches_an_uninterrupted_run(tmp_path, tiny2d, monkeypatch):
    engine = {"epochs": 2, "batch_size": 4, "progress": False, "seed": 1}
    params = {"channels": (4, 8, 8, 8), "latent_dim": 8, "n_critic": 2, "engine": engine}
    full = get_model("fanogan", **params).fit(tiny2d.normal, run_dir=tmp_path / "full")
    original, calls = Engine._run_epoch, {"n": 0}

    def crash_in_encoder_stage(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # 2 GAN epochs, then the 2nd encoder epoch
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_run_epoch", crash_in_encoder_stage)
    with pytest.raises(KeyboardInterrupt):
        get_model("fanogan", **params).fit(tiny2d.normal, run_dir=tmp_path / "resumed")
    monkeypatch.setattr(Engine, "_run_epoch", original)
    resumed = get_model("fanogan", **params).fit(
        tiny2d.normal, run_dir=tmp_path / "resumed", resume=True
    )
    for key, value in full.network_.state_dict().items():
        torch.testing.assert_close(resumed.network_.state_dict()[key], value, rtol=0, atol=0)
