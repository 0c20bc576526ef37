"""Improved DDPM's learned variance (Nichol & Dhariwal 2021): sampling against diffusers' DDPMScheduler
(variance_type="learned_range"), the hybrid loss on a hand-computed case, its stop-gradient, the bound in bits/dim,
and a tiny training run."""
import json
import math
import random

import pytest
import torch
from conftest import tiny_diffusion_recipe
from diffusers import DDPMScheduler
from test_samplers import DIFFUSERS_NAME, RefModel

from carrara.diffusion.objectives import (
    VarianceType,
    diffusion_loss,
    discretized_gaussian_nll,
    log_variance_bounds,
    vlb_terms,
)
from carrara.diffusion.samplers import SAMPLERS, default_timesteps, sample_ddpm
from carrara.diffusion.schedule import NoiseSchedule
from carrara.errors import CarraraError
from carrara.evaluate.nll import bits_per_dim

CASES = [(kind, pt) for kind in ("linear", "cosine") for pt in ("epsilon", "v_prediction")]


class LearnedModel(torch.nn.Module):
    """RefModel's mean output (B, 3, 8, 8) and a variance output v ∈ (−1, 1) that depends on x and t: (B, 6, 8, 8)."""

    def __init__(self, schedule):
        super().__init__()
        self.mean = RefModel(schedule)

    def forward(self, x, t):
        v = torch.tanh(1.5 * x.flip(1) + torch.as_tensor(t, dtype=torch.float32).view(-1, 1, 1, 1) / 400 - 1.0)
        return torch.cat([self.mean(x, t), v], dim=1)


def _diffusers_scheduler(kind, pt, ts, schedule=None):
    """diffusers' DDPMScheduler on our plan; given our schedule, with its float64 ᾱ (its float32 1 − ᾱ_t loses ~3e-4
    of its value at t = 1, which moves the step by ~1e-4: the 1e-5 comparison is of the formulas, not of roundings)."""
    ref = DDPMScheduler(beta_schedule=DIFFUSERS_NAME[kind], prediction_type=pt, clip_sample=False,
                        variance_type="learned_range")
    ref.set_timesteps(timesteps=ts)
    if schedule is not None:
        ref.alphas_cumprod = schedule.alphas_cumprod.clone()
    return ref


def _one_step(model, x, schedule, t, s, seed):
    """sample_ddpm's step t → s from x (the state after its first step, caught by after_step)."""
    states = []
    sample_ddpm(model, x, schedule, [t] + ([s] if s >= 0 else []), generator=torch.Generator().manual_seed(seed),
                after_step=lambda i, abar, x: states.append(x) or x)
    return states[0]


@pytest.mark.parametrize("kind,pt", CASES)
@pytest.mark.parametrize("steps", [1000, 25])
def test_ddpm_learned_range_matches_diffusers(kind, pt, steps):
    """Same x_t, model output and noise → the same x_{t−1} (≤ 1e-5) at every step of the full chain and of respaced
    steps; the whole chains (the same generator's draws in the same order) within 1e-4."""
    schedule = NoiseSchedule.from_config(kind, prediction_type=pt)
    model, x = LearnedModel(schedule), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ts = default_timesteps("ddpm", schedule, steps)
    ref, x_T = _diffusers_scheduler(kind, pt, ts, schedule), x
    picked = set(range(0, steps, max(1, steps // 40))) | {steps - 2, steps - 1}  # 40 of the 1000 full-chain steps
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        x_next = ref.step(model(x, torch.full((2,), t)), t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        if i in picked:  # relative to |x| past 1: cosine's first respaced step multiplies x_T by 1/√α ≈ 500
            error = (_one_step(model, x, schedule, t, s, seed=i) - x_next).abs().max()
            assert error <= 1e-5 * max(1.0, x_next.abs().max().item()), (i, t, error)
        x = x_next
    ours = sample_ddpm(model, x_T, schedule, ts, generator=[torch.Generator().manual_seed(0)])
    ref = _diffusers_scheduler(kind, pt, ts, schedule)
    gen, expected = torch.Generator().manual_seed(0), x_T
    for t in ref.timesteps:
        expected = ref.step(model(expected, t.view(1).expand(2)), t, expected, generator=gen).prev_sample
    assert (ours - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
    # the learned Σ matters: the fixed β̃_t chain (the mean output alone) ends elsewhere
    fixed = sample_ddpm(lambda x, t: model(x, t)[:, :3], x_T, schedule, ts, generator=torch.Generator().manual_seed(0))
    assert (fixed - ours).abs().max() > 1e-3


def test_other_samplers_use_the_mean_channels_only():
    schedule = NoiseSchedule.from_config("linear")
    model, x_T = LearnedModel(schedule), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for name in ("ddim", "dpmpp", "euler"):
        ts = default_timesteps(name, schedule, 10)
        both = SAMPLERS[name](model, x_T, schedule, ts)
        assert torch.equal(both, SAMPLERS[name](lambda x, t: model(x, t)[:, :3], x_T, schedule, ts))


# ---- the hybrid loss on a case computed by hand: T = 3, β = (0.1, 0.2, 0.3), one scalar "image" -------------------
BETAS = (0.1, 0.2, 0.3)


def _tiny_schedule():
    schedule = NoiseSchedule.from_config("linear", T=3, beta_start=0.1, beta_end=0.3)
    assert torch.allclose(schedule.betas, torch.tensor(BETAS, dtype=torch.float64))
    return schedule


def _by_hand(t, x0, noise, eps_hat, v):
    """L_simple + λ T L_t in plain floats, from the formulas of Ho et al. 2020 (eq. 4–7, 13) and Nichol & Dhariwal."""
    abar = [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7]
    a_t, a_s = abar[t], (abar[t - 1] if t > 0 else 1.0)
    beta = BETAS[t]
    x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * noise
    simple = (eps_hat - noise) ** 2
    x0_hat = (x_t - math.sqrt(1 - a_t) * eps_hat) / math.sqrt(a_t)

    def post_mean(x0_):
        return math.sqrt(a_s) * beta / (1 - a_t) * x0_ + math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t) * x_t

    tilde = [BETAS[i] * (1 - (abar[i - 1] if i else 1.0)) / (1 - abar[i]) for i in range(3)]
    log_tilde = math.log(tilde[t] if t > 0 else tilde[1])  # β̃_0 = 0 is clipped to β̃_1
    log_var = (v + 1) / 2 * math.log(beta) + (1 - (v + 1) / 2) * log_tilde
    if t > 0:
        m1, m2 = post_mean(x0), post_mean(x0_hat)
        nats = 0.5 * (-1 + log_var - log_tilde + math.exp(log_tilde - log_var) + (m1 - m2) ** 2 * math.exp(-log_var))
    else:
        m = post_mean(x0_hat)
        nats = 0.5 * (math.log(2 * math.pi) + log_var + (x0 - m) ** 2 * math.exp(-log_var))
    return simple + 0.001 * 3 * nats / math.log(2)


@pytest.mark.parametrize("t,expected", [(2, 0.6415730), (1, 0.6421324), (0, 0.6404783)])
def test_hybrid_loss_by_hand(t, expected):
    schedule = _tiny_schedule()
    x0, noise, eps_hat, v = 0.3, -0.5, 0.3, 0.4
    out = torch.tensor([eps_hat, v], requires_grad=True).view(1, 2, 1, 1)
    loss = diffusion_loss(lambda x, tt: out, torch.full((1, 1, 1, 1), x0), torch.tensor([t]),
                          torch.full((1, 1, 1, 1), noise), schedule)
    assert loss.item() == pytest.approx(_by_hand(t, x0, noise, eps_hat, v), rel=1e-6)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_vlb_gradient_does_not_reach_the_mean():
    """Eq. 16's stop-gradient: the mean channels' gradient is L_simple's alone; the variance channels get L_vlb's."""
    schedule = NoiseSchedule.from_config("cosine")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 5, 400, 990])
    raw = torch.randn(4, 4, 3, 3, generator=g)
    hybrid_out, simple_out = raw.clone().requires_grad_(True), raw[:, :2].clone().requires_grad_(True)
    diffusion_loss(lambda x, tt: hybrid_out, x0, t, noise, schedule).backward()
    diffusion_loss(lambda x, tt: simple_out, x0, t, noise, schedule).backward()
    assert torch.allclose(hybrid_out.grad[:, :2], simple_out.grad, atol=1e-7, rtol=0)
    assert hybrid_out.grad[:, 2:].abs().min() > 0  # every variance output learns from L_vlb
    with_mean_grad = raw.clone().requires_grad_(True)  # without the detach, L_vlb would move the mean too:
    x_t = torch.sqrt(schedule.alphas_cumprod[t]).float().view(-1, 1, 1, 1) * x0 + torch.sqrt(
        1 - schedule.alphas_cumprod[t]).float().view(-1, 1, 1, 1) * noise
    vlb_terms(with_mean_grad[:, :2], with_mean_grad[:, 2:], x0, x_t, t, schedule).sum().backward()
    assert with_mean_grad.grad[:, :2].abs().max() > 1e-3


def test_discretized_decoder_is_the_mass_of_the_pixel_bin():
    x = torch.tensor([-1.0, 0.0, 1.0, 2 / 255 - 1])
    mean, log_var = torch.tensor([-0.9, 0.01, 0.95, -1.0]), torch.full((4,), math.log(0.05**2))
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # the standard normal CDF
    mass = [phi((-1 + 1 / 255 + 0.9) / 0.05), phi((1 / 255 - 0.01) / 0.05) - phi((-1 / 255 - 0.01) / 0.05),
            1 - phi((1 - 1 / 255 - 0.95) / 0.05), phi((2 / 255 - 1 + 1 / 255 + 1) / 0.05) - phi(1 / 255 / 0.05)]
    assert torch.allclose(discretized_gaussian_nll(x, mean, log_var), -torch.log(torch.tensor(mass)), rtol=1e-5)


def test_bound_of_the_exact_denoiser_is_tight_only_with_its_variance():
    """x0 ~ N(0, s²), whose reverse steps are Gaussian: with the exact mean and the exact variance Σ_t = β̃_t +
    c0² Var(x0 | x_t) (as v of eq. 15) the bound Σ_t L_t + L_T is −log p(x0) up to Monte Carlo noise; with the
    fixed σ² = β̃_t it is loose by ~0.9 bits per dimension, lost at the first steps (Nichol & Dhariwal §3.1)."""
    schedule, s2 = NoiseSchedule.from_config("linear"), 0.25
    x0 = math.sqrt(s2) * torch.randn(1024, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    log_beta, log_tilde = log_variance_bounds(schedule)
    abar = schedule.alphas_cumprod

    def exact(x, t):  # ε* = E[ε | x_t] for Gaussian data
        a = abar[t].float().view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x / (a * s2 + 1 - a)

    def exact_v(t: int) -> float:  # v whose Σθ is the true reverse variance β̃_t + c0² Var(x0 | x_t)
        a_t, a_s = abar[t].item(), (abar[t - 1].item() if t else 1.0)
        c0 = math.sqrt(a_s) * (1 - a_t / a_s) / (1 - a_t)
        sigma2 = (math.exp(log_tilde[t]) if t else 0.0) + c0**2 * s2 * (1 - a_t) / (a_t * s2 + 1 - a_t)
        frac = (math.log(sigma2) - log_tilde[t]) / (log_beta[t] - log_tilde[t])
        return 2 * min(max(frac.item(), 0.0), 1.0) - 1

    def exact_learned(x, t):  # (B, 2C, …): the mean output, then v
        return torch.cat([exact(x, t), torch.full_like(x, exact_v(int(t[0])))], dim=1)

    def bound(model) -> float:  # the NLL metric of `carrara eval --metrics nll`
        return bits_per_dim(model, x0, schedule, generator=torch.Generator().manual_seed(1)).mean().item()

    true_nll = (0.5 * math.log(2 * math.pi * s2) + 0.5 * (x0**2).mean().item() / s2) / math.log(2)  # bits/dim
    assert abs(bound(exact_learned) - true_nll) < 0.1  # Monte Carlo noise of one draw per t: ~0.03 bits/dim
    assert bound(exact) > true_nll + 0.5


def test_log_variance_bounds_are_improved_diffusions():
    schedule = _tiny_schedule()
    log_beta, log_tilde = log_variance_bounds(schedule)
    tilde = [0.0, 0.2 * 0.1 / 0.28, 0.3 * 0.28 / (1 - 0.504)]
    assert torch.allclose(log_beta.exp(), torch.tensor(BETAS, dtype=torch.float64))
    assert torch.allclose(log_tilde.exp(), torch.tensor([tilde[1], tilde[1], tilde[2]], dtype=torch.float64))


def test_variance_type_must_fit_the_unet():
    assert VarianceType.of_model({}, 4, 4) is VarianceType.FIXED_SMALL
    assert VarianceType.of_model({"variance_type": "learned_range"}, 4, 8) is VarianceType.LEARNED_RANGE
    with pytest.raises(CarraraError, match="variance_type"):
        VarianceType.of_model({"variance_type": "learned_range"}, 4, 4)
    with pytest.raises(CarraraError, match="variance_type"):
        VarianceType.of_model({}, 4, 8)


def test_tiny_learned_variance_run_trains_and_samples(tiny_shapes, tiny_ae_run, tmp_path):
    from carrara.pipeline import Pipeline
    from carrara.train.diffusion import train_diffusion

    recipe = tiny_diffusion_recipe(tiny_shapes, tiny_ae_run, steps=60)
    recipe.variance, recipe.schedule = "learned_range", "cosine"
    train_diffusion(recipe, tmp_path, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:2]) / 2, losses
    scheduler = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["variance_type"] == "learned_range"
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["out_channels"] == 8
    pipe = Pipeline.load(tmp_path, precision="fp32")
    for sampler in ("ddpm", "dpmpp"):
        latents = pipe(["a red circle"], steps=5, sampler=sampler, output="latent")
        assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


@pytest.fixture(scope="module")
def short_chain_run(tiny_shapes, tiny_ae_run, tmp_path_factory):
    """tiny_diffusion_run's recipe with T = 100: the bound costs T U-Net calls per batch, 10× fewer than T = 1000."""
    from carrara.train.diffusion import train_diffusion

    run = tmp_path_factory.mktemp("dm100")
    recipe = tiny_diffusion_recipe(tiny_shapes, tiny_ae_run, steps=45)
    recipe.num_train_timesteps = 100
    train_diffusion(recipe, run, progress=False)
    return run


def test_eval_nll_metric(short_chain_run, tiny_shapes, tmp_path):
    """`carrara eval --metrics nll`: one number per run, the mean of latent_nll over a seeded subset of --data."""
    from carrara.cli import main
    from carrara.data.folder import load_folder
    from carrara.data.load import preload_images
    from carrara.evaluate.nll import latent_nll
    from carrara.pipeline import Pipeline

    assert main(["eval", "--model", str(short_chain_run), "--data", str(tiny_shapes), "--metrics", "nll",
                 "--n", "4", "--out", str(tmp_path), "--quiet", "--bootstrap", "5"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    (name, value), = metrics.items()
    assert name == "NLL[bits/dim, latents 4×8×8 | caption, n=4, T=100]"
    images, texts = preload_images(load_folder(str(tiny_shapes), size=16), progress=False)
    pick = sorted(random.Random(0).sample(range(len(images)), 4))
    direct = latent_nll(Pipeline.load(short_chain_run), images[pick], [texts[i] for i in pick],  # eval: "auto"
                        progress=False)
    assert value["value"] == pytest.approx(direct.mean().item(), rel=1e-5)
    assert 0 < value["value"] < 10
