"""Noise schedules, q(x_t | x_0), timestep spacings and the ε / x0 / v objectives, against diffusers and by hand."""
import math

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from carrara.diffusion.objectives import diffusion_loss, from_x0_eps, sample_t_and_noise, to_x0_eps
from carrara.diffusion.schedule import (
    NoiseSchedule,
    PredictionType,
    add_noise,
    cosine_betas,
    last_timestep,
    spaced_timesteps,
)
from carrara.errors import CarraraError

KINDS = [("linear", "linear", {}), ("cosine", "squaredcos_cap_v2", {}),
         ("scaled_linear", "scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012})]


@pytest.mark.parametrize("kind,diffusers_name,kw", KINDS)
def test_schedules_equal_diffusers(kind, diffusers_name, kw):
    ours = NoiseSchedule.from_config(kind)
    ref = DDPMScheduler(beta_schedule=diffusers_name, **kw)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float64
    assert (ours.betas - ref.betas.double()).abs().max() <= 1e-7
    # the same cumulative product taken in float64: equal to 1e-7; diffusers' own is a float32 cumprod of 1000
    # factors, which drifts by up to ~5e-7 from the exact value.
    assert (ours.alphas_cumprod - torch.cumprod(1 - ref.betas.double(), 0)).abs().max() <= 1e-7
    assert (ours.alphas_cumprod - ref.alphas_cumprod.double()).abs().max() <= 1e-6


def test_cosine_is_eq_17_of_improved_ddpm():
    T, s = 1000, 0.008
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    abar = torch.cumprod(1 - cosine_betas(T), 0)
    expected = torch.tensor([f[t + 1] / f[0] for t in range(T)], dtype=torch.float64)  # ᾱ_t = f(t) / f(0)
    assert (abar[:-1] - expected[:-1]).abs().max() <= 1e-12  # the last β is clipped to 0.999
    assert cosine_betas(T)[-1] == 0.999


def test_add_noise_equals_diffusers_and_eq_4():
    schedule = NoiseSchedule.from_config("linear")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ours = add_noise(schedule, x0, noise, t)
    assert (ours - DDPMScheduler().add_noise(x0, noise, t)).abs().max() <= 5e-6  # diffusers' float32 ᾱ drifts ~5e-7
    abar = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(501))  # ᾱ_500 by hand
    assert torch.allclose(ours[2], math.sqrt(abar) * x0[2] + math.sqrt(1 - abar) * noise[2], atol=1e-6)
    assert torch.equal(add_noise(schedule, x0[2:3], noise[2:3], 500), ours[2:3])  # an int t works too


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_timesteps_equal_diffusers(spacing):
    schedule = NoiseSchedule.from_config("linear")
    for steps, offset in [(1, 0), (7, 0), (20, 1), (50, 0), (999, 0), (1000, 0)]:
        ref = DDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(steps)
        assert spaced_timesteps(schedule, steps, spacing, steps_offset=offset) == ref.timesteps.tolist()


def test_lambda_min_matches_diffusers_lambda_min_clipped():
    cosine = NoiseSchedule.from_config("cosine")
    ref = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)
    ref.set_timesteps(20)
    assert last_timestep(cosine, -5.1) - 1 == ref.timesteps[0] == 995
    assert last_timestep(NoiseSchedule.from_config("linear"), -5.1) == 1000
    assert torch.allclose(cosine.lambdas().float(), ref.lambda_t, atol=1e-3)


def test_logsnr_spacing_is_uniform_in_lambda():
    schedule = NoiseSchedule.from_config("linear")
    ts = spaced_timesteps(schedule, 10, "logsnr")
    lam = schedule.lambdas()
    step = (lam[0] - lam[-1]) / 10
    assert ts[0] == 999 and len(set(ts)) == 10
    assert all(abs(lam[t] - (lam[-1] + i * step)) < 0.1 for i, t in enumerate(ts))  # nearest integer timestep


def test_config_round_trips_and_reads_a_stable_diffusion_config():
    s = NoiseSchedule.from_config("cosine", T=500, prediction_type="v")
    assert s.prediction_type is PredictionType.V and s.T == 500
    assert s.to_diffusers_config()["beta_schedule"] == "squaredcos_cap_v2"
    back = NoiseSchedule.from_diffusers_config(s.to_diffusers_config())
    assert torch.equal(back.alphas_cumprod, s.alphas_cumprod) and back.prediction_type is PredictionType.V
    sd = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
          "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
          "trained_betas": None}
    sd_schedule = NoiseSchedule.from_diffusers_config(sd)
    assert torch.equal(sd_schedule.betas, NoiseSchedule.from_config("scaled_linear").betas)
    assert sd_schedule.prediction_type is PredictionType.EPSILON
    ref = DDPMScheduler(**{k: v for k, v in sd_schedule.to_diffusers_config().items()})
    assert (sd_schedule.betas - ref.betas.double()).abs().max() <= 1e-7


@pytest.mark.parametrize("bad", [{"kind": "sigmoid"}, {"T": 1}, {"kind": "linear", "beta_start": 0.5, "beta_end": 0.1},
                                 {"prediction_type": "flow"}])
def test_bad_configs_raise_one_line_errors(bad):
    with pytest.raises(CarraraError):
        NoiseSchedule.from_config(**bad)


def test_bad_diffusers_configs_and_spacings_raise():
    with pytest.raises(CarraraError):
        NoiseSchedule.from_diffusers_config({"beta_schedule": "sigmoid"})
    with pytest.raises(CarraraError):
        NoiseSchedule.from_diffusers_config({"beta_schedule": "linear", "trained_betas": [0.1, 0.2]})
    with pytest.raises(CarraraError):
        spaced_timesteps(NoiseSchedule.from_config("linear"), 10, "karras")
    with pytest.raises(CarraraError):
        spaced_timesteps(NoiseSchedule.from_config("linear"), 1001)


# ---- objectives ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pt", list(PredictionType))
def test_converters_round_trip(pt):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    abar = torch.tensor([0.9999, 0.5, 0.01], dtype=torch.float64)  # (B,)
    x_t = abar.sqrt().float()[:, None] * x0 + (1 - abar).sqrt().float()[:, None] * eps
    x0_back, eps_back = to_x0_eps(from_x0_eps(x0, eps, abar, pt), x_t, abar, pt)
    assert torch.allclose(x0_back, x0, atol=1e-4) and torch.allclose(eps_back, eps, atol=1e-4)
    assert PredictionType.parse(pt.value) is pt


def test_v_target_equals_diffusers_get_velocity():
    schedule = NoiseSchedule.from_config("cosine")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([1, 400, 990])
    v = from_x0_eps(x0, eps, schedule.alphas_cumprod[t], "v_prediction")
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2").get_velocity(x0, eps, t)
    assert (v - ref).abs().max() <= 5e-6  # diffusers' float32 ᾱ drifts ~5e-7


@pytest.mark.parametrize("pt", list(PredictionType))
def test_loss_is_zero_for_the_true_target(pt):
    schedule = NoiseSchedule.from_config("linear", prediction_type=pt)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 2, 4, 4, generator=g)
    t, noise = sample_t_and_noise(x0, schedule, g)

    def oracle(x_t, t_):  # knows x0, so recovers the exact ε, v or x0 from x_t
        abar = schedule.alphas_cumprod[t_]
        eps = (x_t - abar.sqrt().float().view(-1, 1, 1, 1) * x0) / (1 - abar).sqrt().float().view(-1, 1, 1, 1)
        return from_x0_eps(x0, eps, abar, pt)

    assert diffusion_loss(oracle, x0, t, noise, schedule) <= 1e-10
    assert diffusion_loss(lambda x_t, t_: torch.zeros_like(x_t), x0, t, noise, schedule) > 0.1


def test_loss_by_hand_for_eps_and_v():
    schedule = NoiseSchedule.from_config("linear")
    x0, noise, t = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 1.0]]), torch.tensor([10])
    zero, one = (lambda x, t_: torch.zeros_like(x)), (lambda x, t_: torch.ones_like(x))
    assert diffusion_loss(zero, x0, t, noise, schedule, "epsilon").item() == pytest.approx((0.25 + 1) / 2)
    assert diffusion_loss(one, x0, t, noise, schedule, "epsilon").item() == pytest.approx((0.25 + 0) / 2)
    abar = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(11))  # ᾱ_10
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    v = [a * 0.5 - s * 1.0, a * 1.0 - s * -2.0]  # v = α ε − σ x0
    assert diffusion_loss(zero, x0, t, noise, schedule, "v").item() == pytest.approx((v[0] ** 2 + v[1] ** 2) / 2)
    assert diffusion_loss(zero, x0, t, noise, schedule, "sample").item() == pytest.approx((1 + 4) / 2)


def test_sample_t_and_noise_is_uniform_and_seeded():
    schedule = NoiseSchedule.from_config("linear", T=10)
    x0 = torch.zeros(5000, 2)
    t, noise = sample_t_and_noise(x0, schedule, torch.Generator().manual_seed(0))
    t2, noise2 = sample_t_and_noise(x0, schedule, torch.Generator().manual_seed(0))
    assert torch.equal(t, t2) and torch.equal(noise, noise2)
    counts = torch.bincount(t, minlength=10)
    assert t.min() == 0 and t.max() == 9 and counts.min() > 400 and counts.max() < 600
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05


@pytest.mark.parametrize("flag", ["clip_sample", "thresholding"])
def test_scheduler_configs_that_clip_x0_are_refused(flag):
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, flag: True}
    with pytest.raises(CarraraError, match="clip_sample or thresholding"):
        NoiseSchedule.from_diffusers_config(config)
    NoiseSchedule.from_diffusers_config({**config, flag: False})  # Stable Diffusion's setting loads
