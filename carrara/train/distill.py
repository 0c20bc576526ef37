"""Latent consistency distillation: a few-step student of a trained text-to-image model, with the classifier-free
guidance scale built in (Luo et al. 2023, "Latent Consistency Models", Algorithm 1 "LCD"; Song et al. 2023,
"Consistency Models", Algorithm 2 "CD").

One training step, per example (numbers are Algorithm 1's lines; diffusers' `train_lcm_distill_sd_wds.py` does the
same):
    3. (z, c) ~ D: a cached latent of a training image and one of its captions
    4. n ~ U{0, …, N−1} on the skip-step grid t_{n+k} = (n+1)k − 1 (consistency.solver_timesteps), t_n = t_{n+k} − k
       (0 at the bottom), and a guidance scale w ~ U[w_min, w_max]
    5. z_{t_{n+k}} = √ᾱ z + √(1 − ᾱ) ε
    6. ẑ_{t_n} = one DDIM step (Song et al. 2021, η = 0) of the *guided teacher* from t_{n+k} to t_n:
       out = out(∅) + w (out(c) − out(∅))  (two teacher passes; carrara's w, LCM's ω = w − 1)
    7. L = d(f_θ(z_{t_{n+k}}, w, c, t_{n+k}), f_θ⁻(ẑ_{t_n}, w, c, t_n)),  d = pseudo-Huber √(δ² + c²) − c or L2
    8. θ⁻ ← μ θ⁻ + (1 − μ) θ: the target network is an exponential moving average of the online one (μ = 0.95)
f_θ = c_skip x + c_out x̂0_θ is the consistency function (diffusion/consistency.py); the student is the teacher's
U-Net plus a guidance-scale embedding (`time_cond_proj_dim`), started from the teacher's weights with that
embedding's projection at zero, so step 0's student is exactly the teacher's conditional network. The trainer core's
EMA *is* the target network θ⁻ (constant μ, no warm-up), and the run folder exports it as the student model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from carrara.diffusion.consistency import SKIP, STUDENT_STEPS, TIMESTEP_SCALING, boundary_scalings, solver_timesteps
from carrara.diffusion.objectives import split_variance, to_x0_eps
from carrara.diffusion.samplers import SchedulerOptions
from carrara.diffusion.schedule import NoiseSchedule, add_noise
from carrara.diffusion.settings import DEFAULTS, MAX_GUIDANCE
from carrara.errors import CarraraError
from carrara.fileio import ensure_dir, write_json_atomic
from carrara.images import image_grid
from carrara.modelfolder import read_json_object, resolve, write_model_folder
from carrara.models.blocks import guidance_embedding
from carrara.models.unet import UNet2DConditionModel as UNet
from carrara.pipeline import Pipeline
from carrara.train.cache import encode_latents
from carrara.train.captions import load_captioned
from carrara.train.core import EMA, TrainConfig, Trainer
from carrara.train.diffusion import EncodedData, make_batch

LOSSES = ("huber", "l2")
MAX_EMBED_DIM = 4096  # w's embedding width: LCM's is 256; a width of 10⁸ asks for tens of GB


@dataclass
class DistillRecipe:
    """What `carrara distill` builds; saved as the run's config.json. Defaults follow LCM (Luo et al. 2023)."""

    teacher: str = "default"  # the model folder to distil (its U-Net, autoencoder, text encoder and schedule)
    data: str = ""  # captioned images (a dataset folder or shards) whose latents start the teacher's trajectories
    caption_variants: str = "captions"
    guidance_min: float = 2.0  # w ~ U[w_min, w_max] in carrara's convention (uncond + w (cond − uncond))
    guidance_max: float = 8.0
    skip: int = SKIP  # k: the teacher's DDIM step jumps k timesteps (LCM: 20, i.e. a 50-point grid on T = 1000)
    embed_dim: int = 256  # time_cond_proj_dim: the width of w's sinusoidal embedding (LCM: 256)
    loss: str = "huber"  # pseudo-Huber (LCM's code) or "l2"
    huber_c: float = 0.001  # c of the pseudo-Huber loss √(δ² + c²) − c (diffusers' LCD default)
    timestep_scaling: float = TIMESTEP_SCALING  # s of c_skip / c_out
    cond_dropout: float = 0.0  # LCM distils on captions only (the teacher's own pass gives ∅)
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = STUDENT_STEPS
    sample_guidance: float = DEFAULTS.guidance
    # ema_decay is μ of the target network θ⁻ (LCM: 0.95); lr small, as the student starts trained
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2000, batch_size=32, lr=5e-5,
                                                                   warmup_steps=50, ema_decay=0.95))


class TargetNetwork(EMA):
    """θ⁻ ← μ θ⁻ + (1 − μ) θ with a constant μ (Song et al. 2023, Algorithm 2; no warm-up, unlike a sampling EMA)."""

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1.0 - self.decay)


class DistillTrainer(Trainer):
    """The trainer core with the target network as its EMA, updated on every process (the loss reads it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ema = TargetNetwork(self.model, self.cfg.ema_decay)

    def step(self, step: int):
        loss, grad_norm = super().step(step)
        if grad_norm is not None and not self.ctx.main:  # the core updates the EMA on rank 0 only
            self.ema.update(self.model, step)
        return loss, grad_norm


def student_unet(teacher: UNet, embed_dim: int) -> UNet:
    """The teacher's U-Net with a guidance embedding of width `embed_dim`, holding the teacher's weights; the
    embedding's projection starts at zero, so the student computes exactly the teacher's conditional output."""
    student = UNet(dataclasses.replace(teacher.config, time_cond_proj_dim=embed_dim))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise CarraraError(f"the teacher's U-Net does not fit its student (missing {missing}, unexpected {unexpected})")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def consistency_fn(net: UNet, x: torch.Tensor, t: torch.Tensor, cond: tuple, w_emb: torch.Tensor,
                   schedule: NoiseSchedule, scaling: float) -> torch.Tensor:
    """f_θ(x, w, c, t) = c_skip(t) x + c_out(t) x̂0_θ (LCM eq. 9), x (B, C, h, w), t (B,) long."""
    out, _ = split_variance(net(x, t, cond[0], class_labels=cond[1], timestep_cond=w_emb).float(), x)
    abar = schedule.alphas_cumprod[t.cpu()]  # (B,) float64
    x0, _ = to_x0_eps(out, x, abar, schedule.prediction_type)
    c_skip, c_out = boundary_scalings(t.double(), scaling)
    shape = (-1, *([1] * (x.ndim - 1)))
    return c_skip.reshape(shape).to(x) * x + c_out.reshape(shape).to(x) * x0  # (B, C, h, w)


@torch.no_grad()
def guided_ddim_step(teacher: UNet, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, w: torch.Tensor, cond: tuple,
                     null: tuple, schedule: NoiseSchedule) -> torch.Tensor:
    """Algorithm 1, line 6: the guided teacher's DDIM step t → s (η = 0): out = out(∅) + w (out(c) − out(∅)), then
    ẑ_s = √ᾱ_s x̂0 + √(1 − ᾱ_s) ε̂ (Song et al. 2021, eq. 12). Two teacher passes in one batch of 2B."""
    pair = [torch.cat([n, c]) if c is not None else None for n, c in zip(null, cond)]  # (2B, …) [∅; c]
    out = teacher(torch.cat([x, x]), torch.cat([t, t]), pair[0], class_labels=pair[1]).float()
    out_uncond, out_cond = split_variance(out, torch.cat([x, x]))[0].chunk(2)  # (B, C, h, w) each
    guided = out_uncond + w.reshape(-1, 1, 1, 1).to(x) * (out_cond - out_uncond)
    abar_t, abar_s = schedule.alphas_cumprod[t.cpu()], schedule.alphas_cumprod[s.cpu()]  # (B,) float64 each
    x0, eps = to_x0_eps(guided, x, abar_t, schedule.prediction_type)
    a_s = abar_s.reshape(-1, 1, 1, 1).to(x)
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps  # (B, C, h, w)


def consistency_loss(online: torch.Tensor, target: torch.Tensor, kind: str, huber_c: float) -> torch.Tensor:
    """d(·, ·) of Algorithm 1, line 7: pseudo-Huber √(δ² + c²) − c (Song & Dhariwal 2023; LCM's code) or L2."""
    if kind == "l2":
        return torch.nn.functional.mse_loss(online.float(), target.float())
    return (torch.sqrt((online.float() - target.float()) ** 2 + huber_c**2) - huber_c).mean()


def _check(recipe: DistillRecipe, schedule: NoiseSchedule) -> None:
    if not recipe.data:
        raise CarraraError("distillation needs captioned images: give --data DIR (or data = … in the recipe)")
    if not 1.0 <= recipe.guidance_min <= recipe.guidance_max:
        raise CarraraError(f"need 1 ≤ guidance_min ≤ guidance_max, got {recipe.guidance_min}, {recipe.guidance_max}")
    if recipe.loss not in LOSSES:
        raise CarraraError(f"loss={recipe.loss!r}: use one of {', '.join(LOSSES)}")
    if not isinstance(recipe.embed_dim, int) or not 4 <= recipe.embed_dim <= MAX_EMBED_DIM or recipe.embed_dim % 2:
        raise CarraraError(f"embed_dim={recipe.embed_dim!r} must be an even whole number from 4 to {MAX_EMBED_DIM}")
    recipe.train.check()  # before the data is encoded, not when the trainer starts
    solver_timesteps(schedule.T, recipe.skip)  # checks k
    if schedule.T % recipe.skip:
        raise CarraraError(f"skip k={recipe.skip} must divide the {schedule.T} training timesteps")
    if not 0.0 <= recipe.cond_dropout < 1.0:
        raise CarraraError(f"cond_dropout must be in [0, 1), got {recipe.cond_dropout}")
    if not recipe.timestep_scaling > 0 or not recipe.huber_c > 0:
        raise CarraraError(f"timestep_scaling and huber_c must be > 0, got {recipe.timestep_scaling}, {recipe.huber_c}")
    if not 1 <= recipe.sample_steps <= schedule.T // recipe.skip:
        raise CarraraError(f"sample_steps={recipe.sample_steps} must be between 1 and {schedule.T // recipe.skip} "
                           "(the student's sampling grid)")
    if not 0.0 <= recipe.sample_guidance <= MAX_GUIDANCE:
        raise CarraraError(f"sample_guidance must be between 0 and {MAX_GUIDANCE:g}, got {recipe.sample_guidance}")


def train_distill(recipe: DistillRecipe, out: str | Path, *, resume: bool = False, progress: bool = True,
                  stop_at: int | None = None, allow_pickle: bool = False) -> dict:
    """Distil `recipe.teacher` into a consistency student in `out`, which becomes a model folder (the target θ⁻)."""
    out = ensure_dir(out)
    teacher_pipe = Pipeline.load(recipe.teacher, allow_pickle=allow_pickle, precision="fp32")
    teacher, schedule, vae = teacher_pipe.unet.requires_grad_(False), teacher_pipe.schedule, teacher_pipe.vae
    if teacher_pipe.student:
        raise CarraraError(f"{recipe.teacher} is a distilled student already: distil its teacher")
    if teacher_pipe.unclip is not None:
        raise CarraraError(f"{recipe.teacher} is an unCLIP model (prior, then decoder): distillation takes a "
                           "text-to-image model")
    if teacher.config.class_embed_type == "timestep":
        raise CarraraError(f"{recipe.teacher} is an upsampler stage, not a text-to-image model")
    _check(recipe, schedule)
    pooled = teacher.config.class_embed_type == "projection"
    folder = resolve(recipe.teacher)
    size = teacher.config.sample_size * vae.config.downsample_factor
    loaded = load_captioned(recipe.data, size, teacher_pipe.text_encoder, recipe.caption_variants,
                            progress=progress, cache_dir=out / "cache")
    mean, std = encode_latents(vae, loaded.images, progress=progress)  # (N, c, h, w) each, unscaled
    loaded.images = None
    data = EncodedData(mean, std, vae.config.scaling_factor, loaded.captions)
    null = (data.captions.null_states.float(), data.captions.null_pooled.float() if pooled else None)  # ∅: (1, L, D)

    torch.manual_seed(recipe.train.seed)
    student = student_unet(teacher, recipe.embed_dim)
    grid = torch.tensor(solver_timesteps(schedule.T, recipe.skip))  # (N,) t_{n+k}, ascending
    options = SchedulerOptions(original_inference_steps=len(grid), timestep_scaling=recipe.timestep_scaling)
    record = {"method": "lcm", "teacher": recipe.teacher, "teacher_hash": teacher_pipe.model_hash,
              "guidance": [recipe.guidance_min, recipe.guidance_max], "skip": recipe.skip}
    scheduler_config = {**folder.scheduler_config, "_class_name": "LCMScheduler",
                        "original_inference_steps": len(grid), "timestep_scaling": recipe.timestep_scaling}

    def loss_fn(model: UNet, idx: torch.Tensor, gen: torch.Generator, rows: slice) -> torch.Tensor:
        # Random numbers are drawn for the whole batch idx, then this call's rows are kept (train/core.py).
        z0, states, pooled_cond = make_batch(data, idx, gen, recipe.cond_dropout)  # line 3: (z, c) ~ D
        n = torch.randint(0, len(grid), (len(idx),), generator=gen)  # line 4: n, and w ~ U[w_min, w_max]
        w = recipe.guidance_min + (recipe.guidance_max - recipe.guidance_min) * torch.rand(len(idx), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        dev = next(model.parameters()).device
        z0, noise, w = z0[rows].to(dev), noise[rows].to(dev), w[rows].to(dev)
        cond = (states[rows].to(dev), pooled_cond[rows].to(dev) if pooled else None)
        t = grid[n[rows]].to(dev)  # t_{n+k}   (b,)
        s = (t - recipe.skip).clamp(min=0)  # t_n
        x = add_noise(schedule, z0, noise, t.cpu())  # line 5: z_{t_{n+k}}
        w_emb = guidance_embedding(w, recipe.embed_dim)  # (b, embed_dim)
        online = consistency_fn(model, x, t, cond, w_emb, schedule, recipe.timestep_scaling)
        with torch.no_grad():
            b = x.shape[0]
            uncond = tuple(None if v is None else v.to(dev).expand(b, *v.shape[1:]) for v in null)
            x_s = guided_ddim_step(teacher.to(dev), x, t, s, w, cond, uncond, schedule)  # line 6
            target = consistency_fn(trainer.ema.model, x_s, s, cond, w_emb, schedule, recipe.timestep_scaling)
        return consistency_loss(online, target, recipe.loss, recipe.huber_c)  # line 7

    prompts = recipe.sample_prompts or loaded.first_captions()

    def sample_fn(target: UNet, step: int):
        pipe = Pipeline(unet=target, vae=vae, text_encoder=teacher_pipe.text_encoder, schedule=schedule,
                        scheduler_options=options, student=record)
        return image_grid(pipe(prompts, steps=recipe.sample_steps, sampler="lcm", guidance=recipe.sample_guidance),
                          rows=1)

    text_encoder = str(folder.root) if folder.tokenizer else folder.text_encoder

    def export_fn(target: UNet) -> None:
        write_model_folder(out, unet=target, vae_dir=folder.vae, scheduler_config=scheduler_config,
                           text_encoder=text_encoder, extra={"student": record})
        index = read_json_object(out / "model_index.json")
        write_json_atomic(out / "model_index.json", {**index, "scheduler": ["diffusers", "LCMScheduler"]})

    trainer = DistillTrainer.for_stage("distill", recipe, out, student, records=loaded.records, report=loaded.report,
                                       n_examples=len(mean), loss_fn=loss_fn, sample_fn=sample_fn, export_fn=export_fn)
    result = trainer.fit(resume=resume, progress=progress, stop_at=stop_at)
    return {**result, "n_images": len(mean), "teacher": recipe.teacher}

