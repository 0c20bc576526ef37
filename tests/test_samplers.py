"""Samplers against diffusers (same model, timesteps and noise → same sample) and on an analytic data distribution."""
import itertools
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from carrara.diffusion.objectives import from_x0_eps
from carrara.diffusion.samplers import (
    DPM_LAMBDA_MIN,
    SAMPLERS,
    default_timesteps,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
)
from carrara.diffusion.schedule import NoiseSchedule, spaced_timesteps
from carrara.errors import CarraraError

DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


CASES = [(kind, pt) for kind in ("linear", "cosine") for pt in ("epsilon", "v_prediction")]


class RefModel(torch.nn.Module):
    """A fixed denoiser for (B, 3, 8, 8): the exact one for x0 ~ N(μ, s² I), plus a small random conv-net term."""

    def __init__(self, schedule: NoiseSchedule):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.schedule, self.s2 = schedule, 0.25
        self.mu = 0.5 * torch.randn(1, 3, 8, 8, generator=g)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(0.3 * torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(0.1 * torch.randn(3, generator=g))

    def forward(self, x, t):
        abar = self.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        a, v = abar.sqrt(), abar * self.s2 + 1 - abar
        x0 = self.mu + a * self.s2 / v * (x - a * self.mu)  # E[x0 | x_t] for a Gaussian x0
        eps = (x - a * x0) / (1 - abar).sqrt() + 0.05 * torch.tanh(self.conv(x) + t.view(-1, 1, 1, 1) / 500)
        return from_x0_eps((x - (1 - abar).sqrt() * eps) / a, eps, abar, self.schedule.prediction_type)


def _setup(kind, pt):
    schedule = NoiseSchedule.from_config(kind, prediction_type=pt)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return schedule, RefModel(schedule), x_T


def _diffusers_loop(scheduler, model, x, step_kwargs=None):
    x0s = []
    for t in scheduler.timesteps:
        out = scheduler.step(model(x, t.view(1).expand(x.shape[0])), t, x, **(step_kwargs or {}))
        x = out.prev_sample
        x0s.append(getattr(out, "pred_original_sample", None))
    return x, x0s


@pytest.mark.parametrize("kind,pt", CASES)
def test_ddpm_matches_diffusers_respaced_and_stochastic(kind, pt):
    schedule, model, x_T = _setup(kind, pt)
    ref = DDPMScheduler(beta_schedule=DIFFUSERS_NAME[kind], prediction_type=pt, clip_sample=False,
                        timestep_spacing="linspace")
    ref.set_timesteps(25)
    ts = default_timesteps("ddpm", schedule, 25)
    assert ts == ref.timesteps.tolist()
    expected, _ = _diffusers_loop(ref, model, x_T, {"generator": torch.Generator().manual_seed(7)})
    ours = sample_ddpm(model, x_T, schedule, ts, generator=torch.Generator().manual_seed(7))
    assert (ours - expected).abs().max() <= 1e-4


def test_ddpm_full_chain_is_algorithm_2_and_matches_diffusers():
    schedule, model, x_T = _setup("linear", "epsilon")
    ref = DDPMScheduler(clip_sample=False)  # no set_timesteps: the full chain t = 999, …, 0
    expected, _ = _diffusers_loop(ref, model, x_T, {"generator": torch.Generator().manual_seed(3)})
    ts = default_timesteps("ddpm", schedule, 1000)
    assert ts == list(range(999, -1, -1))
    ours = sample_ddpm(model, x_T, schedule, ts, generator=torch.Generator().manual_seed(3))
    assert (ours - expected).abs().max() <= 1e-4


def test_ddpm_with_clipped_x0_matches_diffusers_clip_sample():
    schedule, model, x_T = _setup("linear", "epsilon")
    ref = DDPMScheduler(clip_sample=True, timestep_spacing="linspace")
    ref.set_timesteps(10)
    expected, _ = _diffusers_loop(ref, model, 3 * x_T, {"generator": torch.Generator().manual_seed(5)})
    ours = sample_ddpm(model, 3 * x_T, schedule, ref.timesteps, generator=torch.Generator().manual_seed(5),
                       clip_x0=1.0)
    assert (ours - expected).abs().max() <= 1e-4
    assert ours.abs().max() <= 1.0 + 1e-5  # the last step returns the clipped x̂0


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("kind,pt", CASES)
def test_ddim_matches_diffusers(kind, pt, eta):
    schedule, model, x_T = _setup(kind, pt)
    ref = DDIMScheduler(beta_schedule=DIFFUSERS_NAME[kind], prediction_type=pt, clip_sample=False)
    ref.set_timesteps(20)
    ts = default_timesteps("ddim", schedule, 20)
    assert ts == ref.timesteps.tolist()
    expected, ref_x0s = _diffusers_loop(ref, model, x_T, {"eta": eta, "generator": torch.Generator().manual_seed(11)})
    x0s = []
    ours = sample_ddim(model, x_T, schedule, ts, eta=eta, generator=torch.Generator().manual_seed(11),
                       callback=lambda i, t, x, x0: x0s.append((i, t, x0)))
    assert (ours - expected).abs().max() <= 1e-4
    assert [(i, t) for i, t, _ in x0s] == list(enumerate(ts))  # one callback per step, in order
    assert max((a[2] - b).abs().max().item() for a, b in zip(x0s, ref_x0s)) <= 1e-3  # x̂0 previews = diffusers'


@pytest.mark.parametrize("kind,pt", CASES)
def test_dpmpp_2m_matches_diffusers(kind, pt):
    schedule, model, x_T = _setup(kind, pt)
    ts = default_timesteps("dpmpp", schedule, 20)
    ref = DPMSolverMultistepScheduler(beta_schedule=DIFFUSERS_NAME[kind], prediction_type=pt)
    ref.set_timesteps(timesteps=ts)
    expected, _ = _diffusers_loop(ref, model, x_T)
    ours = sample_dpmpp_2m(model, x_T, schedule, ts)
    assert (ours - expected).abs().max() <= 1e-4


def test_dpmpp_2m_matches_diffusers_on_its_own_default_timesteps():
    schedule, model, x_T = _setup("linear", "epsilon")
    ref = DPMSolverMultistepScheduler()  # linspace spacing, lower_order_final, final_sigmas_type="zero"
    ref.set_timesteps(10)
    expected, _ = _diffusers_loop(ref, model, x_T)
    assert (sample_dpmpp_2m(model, x_T, schedule, ref.timesteps) - expected).abs().max() <= 1e-4


# ---- an analytic data distribution: a mixture of three 2-D Gaussians --------------------------------------------
MU = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=torch.float64)  # (K, 2)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # (K,)
S = 0.3  # each component is N(μ_k, S² I)


def mixture_eps_model(schedule: NoiseSchedule, model_error: float = 0.01):
    """ε*(x_t, t) = (x_t − √ᾱ E[x0 | x_t]) / √(1 − ᾱ), exact for the mixture, plus a fixed 1% error.

    A trained network is never exact; the error (0.01 · sin(3x + 1)) is what exposes samplers that amplify it.
    """

    def model(x, t):
        x, abar = x.double(), schedule.alphas_cumprod[t].view(-1, 1)  # (N, 2), (N, 1)
        a, var = abar.sqrt(), abar * S**2 + 1 - abar  # x_t | k ~ N(√ᾱ μ_k, var I)
        resid = x[:, None, :] - a[:, None, :] * MU  # (N, K, 2)
        w = torch.softmax(WEIGHTS.log() - (resid**2).sum(-1) / (2 * var), dim=-1)  # p(k | x_t)   (N, K)
        x0 = (w[..., None] * (MU + (a * S**2 / var)[:, None, :] * resid)).sum(1)  # E[x0 | x_t]   (N, 2)
        eps = (x - a * x0) / (1 - abar).sqrt()
        return (eps + model_error * torch.sin(3 * x + 1)).float()

    return model


def mixture_errors(x: torch.Tensor) -> tuple[float, float, float]:
    """Worst |weight − w_k|, |mean − μ_k| and |std/S − 1| over the components (samples assigned to the nearest μ_k)."""
    x = x.double()
    k = torch.cdist(x, MU).argmin(1)
    weights = torch.bincount(k, minlength=3).double() / len(x)
    if (weights == 0).any():
        return 1.0, math.inf, math.inf
    means = torch.stack([x[k == j].mean(0) for j in range(3)])
    stds = torch.stack([(x[k == j] - MU[j]).pow(2).mean().sqrt() for j in range(3)])
    return ((weights - WEIGHTS).abs().max().item(), (means - MU).abs().max().item(),
            (stds / S - 1).abs().max().item())


def assert_matches_mixture(x: torch.Tensor):
    w_err, mean_err, std_err = mixture_errors(x)
    # sampling noise (N = 2000) and the 1% model error each move the weights by ~0.02; a failed sampler is off by
    # > 0.1 in weight, > 3 in mean and > 2 (200%) in spread.
    assert w_err <= 0.06 and mean_err <= 0.1 and std_err <= 0.12, (w_err, mean_err, std_err)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddim", 50), ("dpmpp", 20)])
def test_samplers_reproduce_the_data_distribution(kind, sampler, steps):
    schedule = NoiseSchedule.from_config(kind)
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    ts = default_timesteps(sampler, schedule, steps)
    x = get_sampler(sampler)(mixture_eps_model(schedule), x_T, schedule, ts,
                             generator=torch.Generator().manual_seed(1))
    assert_matches_mixture(x)


def test_diffusers_default_dpmpp_fails_on_cosine_and_the_lambda_clip_fixes_it():
    """The pitfall: DPMSolverMultistepScheduler(squaredcos_cap_v2) defaults start at λ ≈ −9.9 and give noise."""
    schedule = NoiseSchedule.from_config("cosine")
    model = mixture_eps_model(schedule)
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    ref = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2")
    ref.set_timesteps(20)
    assert ref.timesteps[0] == 999
    x_ref, _ = _diffusers_loop(ref, model, x_T)
    w_err, mean_err, std_err = mixture_errors(x_ref)
    assert w_err > 0.1 and mean_err > 1.0 and std_err > 2.0  # spread ~10× wider than the data: noise
    x_ours_unclipped = sample_dpmpp_2m(model, x_T, schedule, ref.timesteps)  # same algorithm, same timesteps …
    assert torch.allclose(x_ours_unclipped, x_ref, atol=1e-2) and mixture_errors(x_ours_unclipped)[2] > 2.0  # … fails
    ts = default_timesteps("dpmpp", schedule, 20)
    assert ts[0] == 995 and schedule.lambdas()[ts[0]] >= DPM_LAMBDA_MIN > schedule.lambdas()[ts[0] + 1]
    assert_matches_mixture(sample_dpmpp_2m(model, x_T, schedule, ts))


def test_default_timesteps():
    linear, cosine = NoiseSchedule.from_config("linear"), NoiseSchedule.from_config("cosine")
    assert default_timesteps("ddim", linear, 50)[:3] == [980, 960, 940]
    assert default_timesteps("ddpm", linear, 4) == [999, 666, 333, 0]
    assert default_timesteps("dpmpp", linear, 20)[0] == 999  # the clip removes nothing from the linear schedule
    for steps in (1, 2, 20, 50, 300, 996):
        ts = default_timesteps("dpmpp", cosine, steps)
        assert len(ts) == steps and all(a > b for a, b in itertools.pairwise(ts)) and ts[0] <= 995
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpmpp"}
    with pytest.raises(CarraraError):
        default_timesteps("euler", linear, 10)
    with pytest.raises(CarraraError):
        sample_ddim(lambda x, t: x, torch.zeros(1, 2), linear, [10, 20])
    with pytest.raises(CarraraError):
        spaced_timesteps(linear, 0)
