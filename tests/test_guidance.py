"""Classifier-free guidance (w = 1 is the conditional model, exactly) and classifier guidance on closed-form cases."""
import math

import pytest
import torch

from carrara.diffusion.guidance import cfg_model, classifier_guided_model
from carrara.diffusion.objectives import from_x0_eps, to_x0_eps
from carrara.diffusion.samplers import default_timesteps, sample_ddim
from carrara.diffusion.schedule import NoiseSchedule


class CountingModel(torch.nn.Module):
    """model(x, t, states): a fixed nonlinear function of all three that records the batch size of each call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, states):  # (B, C, H, W), (B,), (B, L, D)
        self.calls.append(x.shape[0])
        return torch.tanh(x * states.mean((1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([999, 500, 1])
    cond, uncond = torch.randn(3, 7, 16, generator=g), torch.randn(1, 7, 16, generator=g)
    return x, t, cond, uncond


def test_cfg_at_w_1_is_the_conditional_model_in_one_pass():
    model = CountingModel()
    x, t, cond, uncond = _inputs()
    out = cfg_model(model, cond, uncond, 1.0)(x, t)
    assert torch.equal(out, model(x, t, cond))
    assert model.calls == [3, 3]  # no unconditional pass


@pytest.mark.parametrize("w", [0.0, 3.0, 7.5])
def test_cfg_is_uncond_plus_w_times_difference_in_one_batched_pass(w):
    model = CountingModel()
    x, t, cond, uncond = _inputs()
    out = cfg_model(model, cond, uncond, w)(x, t)
    assert model.calls == [6]  # uncond and cond batched together
    e_uncond, e_cond = model(x, t, uncond.expand(3, -1, -1)), model(x, t, cond)
    assert torch.allclose(out, e_uncond + w * (e_cond - e_uncond), atol=1e-6)
    if w == 0.0:
        assert torch.allclose(out, e_uncond, atol=1e-7)


def test_cfg_plugs_into_a_sampler():
    """DDIM on cfg_model equals DDIM (η = 0, eq. 12) written out by hand on ε̃ = ε(∅) + w (ε(c) − ε(∅))."""
    schedule, w = NoiseSchedule.from_config("linear"), 4.0
    model = CountingModel()
    x_T, _, cond, uncond = _inputs()
    ts = default_timesteps("ddim", schedule, 5)
    out = sample_ddim(cfg_model(model, cond, uncond, w), x_T, schedule, ts)
    assert model.calls == [6] * 5  # one batched pass per step

    x = x_T
    for t, s in zip(ts, [*ts[1:], None], strict=True):
        abar_t = schedule.alphas_cumprod[t].item()
        abar_s = schedule.alphas_cumprod[s].item() if s is not None else 1.0
        tt = torch.full((3,), t)
        e_uncond, e_cond = model(x, tt, uncond.expand(3, -1, -1)), model(x, tt, cond)
        eps = e_uncond + w * (e_cond - e_uncond)
        x0 = (x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
        x = math.sqrt(abar_s) * x0 + math.sqrt(1 - abar_s) * eps
    assert torch.allclose(out, x, rtol=1e-5, atol=1e-5), (out - x).abs().max()  # |x| reaches ~150 here: rtol
    unguided = sample_ddim(lambda x, t: model(x, t, cond), x_T, schedule, ts)
    assert (out - unguided).abs().max() > 1.0  # w = 4 moved the result far: the comparison above can tell


# ---- classifier guidance: data x0 ~ N(0, I), so x_t ~ N(0, I) and ε*(x_t, t) = √(1 − ᾱ_t) x_t exactly ------------
def _gaussian_data_model(schedule):
    def model(x, t):
        abar = schedule.alphas_cumprod[t].view(-1, *([1] * (x.ndim - 1)))
        eps = (1 - abar).sqrt().float() * x  # ε* for x0 ~ N(0, I)
        x0 = abar.sqrt().float() * x  # E[x0 | x_t]
        return from_x0_eps(x0, eps, abar, schedule.prediction_type)

    return model


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_classifier_guidance_equals_the_closed_form(pt):
    schedule = NoiseSchedule.from_config("cosine", prediction_type=pt)
    m, tau, scale = torch.tensor([1.0, -2.0]), 0.7, 2.5

    def log_prob(x, t):  # log p(y | x_t) = −|x_t − m|² / (2τ²) + const
        return -((x - m) ** 2).sum(-1) / (2 * tau**2)

    x, t = torch.randn(5, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 100, 500, 900, 999])
    guided = classifier_guided_model(_gaussian_data_model(schedule), log_prob, scale, schedule)(x, t)
    abar = schedule.alphas_cumprod[t]
    _, eps = to_x0_eps(guided, x, abar, pt)
    sigma = (1 - abar).sqrt().float()[:, None]
    expected = sigma * x - sigma * scale * (-(x - m) / tau**2)  # ε̂ = ε − √(1 − ᾱ) s ∇ log p, ∇ = −(x − m)/τ²
    assert torch.allclose(eps, expected, atol=1e-4)


@pytest.mark.parametrize("scale,mean,std", [(1.0, 1.2, math.sqrt(0.2)), (0.0, 0.0, 1.0)])
def test_exact_classifier_guidance_samples_the_posterior(scale, mean, std):
    """x0 ~ N(0, 1), y = x0 + N(0, τ0²): with the exact noise-aware classifier, s = 1 samples p(x0 | y) exactly."""
    schedule = NoiseSchedule.from_config("linear")
    y, tau0_sq = 1.5, 0.25

    def log_prob(x, t):  # y | x_t ~ N(√ᾱ x_t, 1 − ᾱ + τ0²)
        abar = schedule.alphas_cumprod[t].float().view(-1, 1)
        return (-(y - abar.sqrt() * x) ** 2 / (2 * (1 - abar + tau0_sq))).sum(-1)

    model = classifier_guided_model(_gaussian_data_model(schedule), log_prob, scale, schedule)
    x_T = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0))
    x = sample_ddim(model, x_T, schedule, default_timesteps("ddim", schedule, 200))  # 50 steps: std 7% low
    # posterior N(y / (1 + τ0²), τ0² / (1 + τ0²)) = N(1.2, 0.2); without guidance the prior N(0, 1)
    assert abs(x.mean().item() - mean) < 0.04 and abs(x.std().item() / std - 1) < 0.04
