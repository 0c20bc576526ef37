"""Samplers against diffusers (same model, timesteps and noise → same sample) and on an analytic data distribution."""
import itertools
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from PIL import Image
from test_cli_generate import write_tiny_model

from carrara.cli import main
from carrara.diffusion.objectives import from_x0_eps
from carrara.diffusion.samplers import (
    DPM_LAMBDA_MIN,
    SAMPLERS,
    default_timesteps,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_karras,
    sample_euler,
    sample_euler_ancestral,
)
from carrara.diffusion.schedule import NoiseSchedule, spaced_timesteps
from carrara.errors import CarraraError
from carrara.png import read_png_metadata

DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


CASES = [(kind, pt) for kind in ("linear", "cosine") for pt in ("epsilon", "v_prediction")]


def alpha_bar_at(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """ᾱ at (fractional) timesteps t (B,), float64: σ = √((1 − ᾱ)/ᾱ) interpolated linearly in t, as diffusers' Euler."""
    abar = schedule.alphas_cumprod.numpy()
    sigma = np.interp(t.double().cpu().numpy(), np.arange(schedule.T), np.sqrt((1 - abar) / abar))
    return torch.from_numpy(1 / (1 + sigma**2))  # exactly ᾱ_t at whole t (up to rounding)


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
        abar = alpha_bar_at(self.schedule, t).float().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
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


def assert_like_diffusers(ours, expected, x0s, ref_x0s, ts) -> None:
    """Final sample within 1e-4 of diffusers', one callback per step in order, x̂0 previews within 1e-3 of diffusers'."""
    assert (ours - expected).abs().max() <= 1e-4
    assert [(i, t) for i, t, _ in x0s] == list(enumerate(ts))
    assert max((a[2] - b).abs().max().item() for a, b in zip(x0s, ref_x0s)) <= 1e-3


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
    assert_like_diffusers(ours, expected, x0s, ref_x0s, ts)


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


# ---- the samplers users know: Euler, Euler ancestral, DPM++ 2M Karras (σ-space, Karras et al. 2022) -------------
SIGMA_CASES = [(kind, pt) for kind in ("linear", "scaled_linear") for pt in ("epsilon", "v_prediction")]


def _diffusers_sigma_loop(scheduler, model, x, step_kwargs=None):
    """diffusers' own loop for σ-space schedulers: scale_model_input (x_σ → x_t = α x_σ), model, step."""
    x0s = []
    for t in scheduler.timesteps:
        out = scheduler.step(model(scheduler.scale_model_input(x, t), t.view(1).expand(x.shape[0])), t, x,
                             **(step_kwargs or {}))
        x = out.prev_sample
        x0s.append(out.pred_original_sample)
    return x, x0s


def _x_sigma_T(schedule, x_T):
    """x_σ = x_T / α at t = T − 1: diffusers' Euler start √(σ_max² + 1) · x_T (its init for "leading" spacing; for
    "linspace" diffusers starts at σ_max · x_T, 0.3% smaller on SD's schedule — carrara's x_T is the VP sample)."""
    return x_T / float(schedule.alphas_cumprod[-1]) ** 0.5


@pytest.mark.parametrize("kind,pt", SIGMA_CASES)
def test_euler_matches_diffusers_euler_discrete(kind, pt):
    schedule, model, x_T = _setup(kind, pt)
    ref = EulerDiscreteScheduler(**schedule.to_diffusers_config())  # linspace, linear σ interpolation, final σ = 0
    ref.set_timesteps(20)
    ts = default_timesteps("euler", schedule, 20)
    assert ts[0] == 999 and ts[-1] == 0 and ts[1] != int(ts[1])  # fractional inner timesteps, as diffusers'
    assert np.allclose(ts, ref.timesteps.numpy(), atol=1e-3)
    expected, ref_x0s = _diffusers_sigma_loop(ref, model, _x_sigma_T(schedule, x_T))
    x0s = []
    ours = sample_euler(model, x_T, schedule, ts, callback=lambda i, t, x, x0: x0s.append((i, t, x0)))
    assert_like_diffusers(ours, expected, x0s, ref_x0s, ts)


@pytest.mark.parametrize("kind,pt", SIGMA_CASES)
def test_euler_ancestral_matches_diffusers_with_the_same_noise(kind, pt):
    schedule, model, x_T = _setup(kind, pt)
    ref = EulerAncestralDiscreteScheduler(**schedule.to_diffusers_config())
    ref.set_timesteps(20)
    ts = default_timesteps("euler_a", schedule, 20)
    assert np.allclose(ts, ref.timesteps.numpy(), atol=1e-3)
    expected, _ = _diffusers_sigma_loop(ref, model, _x_sigma_T(schedule, x_T),
                                        {"generator": torch.Generator().manual_seed(11)})
    ours = sample_euler_ancestral(model, x_T, schedule, ts, generator=torch.Generator().manual_seed(11))
    assert (ours - expected).abs().max() <= 1e-4
    other_seed = sample_euler_ancestral(model, x_T, schedule, ts, generator=torch.Generator().manual_seed(12))
    assert (other_seed - expected).abs().max() > 0.05  # the noise matters: it is diffusers' draws, not zeros


def test_euler_ancestral_with_one_generator_per_image_matches_diffusers_and_each_image_alone():
    schedule, model, x_T = _setup("scaled_linear", "epsilon")
    ts = default_timesteps("euler_a", schedule, 10)
    ref = EulerAncestralDiscreteScheduler(**schedule.to_diffusers_config())
    ref.set_timesteps(10)

    def gens():
        return [torch.Generator().manual_seed(s) for s in (5, 6)]

    expected, _ = _diffusers_sigma_loop(ref, model, _x_sigma_T(schedule, x_T), {"generator": gens()})
    batch = sample_euler_ancestral(model, x_T, schedule, ts, generator=gens())
    assert (batch - expected).abs().max() <= 1e-4  # diffusers' `randn_tensor` with a list of generators
    alone = sample_euler_ancestral(model, x_T[1:], schedule, ts, generator=[torch.Generator().manual_seed(6)])
    torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=0)  # image 1 does not depend on image 0
    with pytest.raises(CarraraError, match="3 generators for a batch of 2"):
        sample_euler_ancestral(model, x_T, schedule, ts, generator=gens() + gens()[:1])


@pytest.mark.parametrize("kind,pt", SIGMA_CASES)
def test_dpmpp_2m_karras_matches_diffusers(kind, pt):
    schedule, model, x_T = _setup(kind, pt)
    ref = DPMSolverMultistepScheduler(**schedule.to_diffusers_config(), use_karras_sigmas=True,
                                      algorithm_type="dpmsolver++", solver_order=2)
    ref.set_timesteps(20)
    ts = default_timesteps("dpmpp_karras", schedule, 20)
    assert [round(t) for t in ts] == ref.timesteps.tolist()  # the network is told the rounded Karras timesteps …
    # … and the solver steps on the Karras σ themselves (diffusers' sigmas, from a float32 ᾱ: 1 − ᾱ_0 ≈ 1e-4 keeps
    # only ~4 digits there, hence rtol 5e-4)
    abar = schedule.alphas_cumprod.numpy()
    sigmas = np.exp(np.interp(ts, np.arange(schedule.T), np.log(np.sqrt((1 - abar) / abar))))
    assert np.allclose(sigmas, ref.sigmas[:-1].numpy(), rtol=5e-4)
    expected, _ = _diffusers_loop(ref, model, x_T)  # VP space: diffusers' DPM-Solver takes x_T itself
    ours = sample_dpmpp_2m_karras(model, x_T, schedule, ts)
    assert (ours - expected).abs().max() <= 1e-4
    # the same solver on the rounded timesteps' own σ is another method, ≥ 4e-4 away: the tolerance tells them apart
    on_the_integer_grid = sample_dpmpp_2m(model, x_T, schedule, ref.timesteps)
    assert (on_the_integer_grid - expected).abs().max() > 3e-4


# ---- an analytic data distribution: a mixture of three 2-D Gaussians --------------------------------------------
MU = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=torch.float64)  # (K, 2)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # (K,)
S = 0.3  # each component is N(μ_k, S² I)


def mixture_eps_model(schedule: NoiseSchedule, model_error: float = 0.01):
    """ε*(x_t, t) = (x_t − √ᾱ E[x0 | x_t]) / √(1 − ᾱ), exact for the mixture, plus a fixed 1% error.

    A trained network is never exact; the error (0.01 · sin(3x + 1)) is what exposes samplers that amplify it.
    """

    def model(x, t):
        x, abar = x.double(), alpha_bar_at(schedule, t).view(-1, 1)  # (N, 2), (N, 1)
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
@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddim", 50), ("dpmpp", 20), ("euler", 50),
                                           ("euler_a", 100), ("dpmpp_karras", 20)])
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
    assert list(SAMPLERS) == ["ddpm", "ddim", "dpmpp", "euler", "euler_a", "dpmpp_karras", "lcm"]
    assert default_timesteps("euler", linear, 4) == [999.0, 666.0, 333.0, 0.0]
    assert default_timesteps("euler", linear, 1) == [999.0]  # one step starts from pure noise, not at t = 0
    assert default_timesteps("euler", cosine, 20)[0] == 995 == default_timesteps("dpmpp", cosine, 20)[0]  # λ ≥ −5.1
    assert default_timesteps("dpmpp_karras", cosine, 20)[0] == 995
    karras = default_timesteps("dpmpp_karras", linear, 300)  # dense near σ_min: still strictly decreasing
    assert len(karras) == 300 and all(a > b for a, b in itertools.pairwise(karras)) and karras[-1] == 0
    with pytest.raises(CarraraError):
        default_timesteps("heun", linear, 10)
    with pytest.raises(CarraraError):
        sample_euler(lambda x, t: x, torch.zeros(1, 2), linear, [10.5, 20.0])
    with pytest.raises(CarraraError):
        sample_ddim(lambda x, t: x, torch.zeros(1, 2), linear, [10, 20])
    with pytest.raises(CarraraError):
        spaced_timesteps(linear, 0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model"))  # scaled_linear: Euler's fractional t reach the U-Net


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_karras"])
def test_carrara_generate_with_the_new_samplers_is_deterministic_per_seed(sampler, tiny_model, tmp_path):
    model = tiny_model

    def generate(seed, name):
        argv = ["generate", "a red circle", "--model", str(model), "--steps", "3", "--precision", "fp32", "--quiet",
                "--sampler", sampler, "--seed", str(seed), "-o", str(tmp_path / name)]
        assert main(argv) == 0
        return np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(int)

    first, again, other = generate(1, "a.png"), generate(1, "b.png"), generate(2, "c.png")
    assert np.array_equal(first, again)  # same seed → same pixels, also through euler_a's noise
    assert np.abs(first - other).max() > 10  # another seed → another image
    assert read_png_metadata(tmp_path / "a.png")["sampler"] == sampler
