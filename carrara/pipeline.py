"""Text → image: encode the prompt, start from noise, denoise with guidance, decode (Rombach et al. 2022, Fig. 3);
a cascade then runs its upsampler on the small image (Ho et al. 2021; carrara/upsampler.py).

The denoising loop is written out once, in `Pipeline.__call__`, and training's sample grids use it.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from carrara.diffusion.guidance import cfg_model
from carrara.diffusion.samplers import SAMPLERS, SchedulerOptions, sampling_plan
from carrara.diffusion.schedule import NoiseSchedule
from carrara.diffusion.settings import DEFAULTS, GenerationSettings
from carrara.errors import CarraraError
from carrara.hardware import cpu_supports_bf16
from carrara.images import to_pil
from carrara.modelfolder import resolve
from carrara.models.autoencoder import AutoencoderKL
from carrara.models.unet import UNet2DConditionModel as UNet
from carrara.text.encoder import TextEncoder, mean_pool
from carrara.upsampler import Upsampler, UpsamplerSettings, depth_to_space

MAX_BATCH = 64
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str) -> str:
    """"auto" → "bf16" where the CPU has native bf16 dot products (docs/performance.md measures both), else "fp32"."""
    if precision not in PRECISIONS:
        raise CarraraError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return precision


def _check_finite(x: torch.Tensor, part: str) -> torch.Tensor:
    """x itself, or one clear error if it holds NaN/inf (damaged weights would otherwise save a black image)."""
    if not torch.isfinite(x).all():
        raise CarraraError(f"the {part} produced non-finite values (NaN or inf): its weights are damaged")
    return x


class Pipeline:
    """A text encoder, a U-Net noise predictor, a noise schedule and an autoencoder's decoder."""

    def __init__(self, *, unet, vae, text_encoder, schedule: NoiseSchedule, model_hash: str = "", name: str = "",
                 scheduler_options: SchedulerOptions | None = None, precision: str = "fp32",
                 upsampler: Upsampler | None = None):
        self.unet, self.vae, self.text_encoder = unet.eval(), vae.eval(), text_encoder
        self.upsampler = upsampler  # the cascade's second stage (carrara/upsampler.py), or None
        self.schedule = schedule  # ᾱ_t and what the U-Net predicts (schedule.prediction_type)
        self.scheduler_options = scheduler_options or SchedulerOptions()
        self.model_hash, self.name = model_hash, name
        self.precision = resolve_precision(precision)
        # bf16 weights (not autocast: no per-step casts of the weights) for the U-Net, which does ~all the work;
        # the sampler's state, the guidance sum, the text encoder and the decoder stay fp32.
        self.unet_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        if self.precision == "bf16" and next(self.unet.parameters()).dtype != torch.bfloat16:
            self.unet = self.unet.to(torch.bfloat16)
        if upsampler is not None:
            upsampler.unet.to(self.unet_dtype)

    @classmethod
    def load(cls, path: str | Path = "default", *, allow_pickle: bool = False, precision: str = "auto") -> Pipeline:
        """Load a carrara run folder, the packaged "default" model, or a diffusers SD folder.

        Weights are read from safetensors only, unless allow_pickle lets `.bin` files be read weights-only.
        precision: "fp32", "bf16" (U-Net weights in bf16) or "auto" (bf16 where the CPU has native bf16)."""
        precision = resolve_precision(precision)
        folder = resolve(path)
        unet = UNet.from_pretrained(folder.unet, allow_pickle=allow_pickle)
        vae = AutoencoderKL.from_pretrained(folder.vae, allow_pickle=allow_pickle)
        text_encoder = TextEncoder.load(folder.text_encoder, tokenizer_path=folder.tokenizer, allow_pickle=allow_pickle)
        if text_encoder.dim != unet.config.cross_attention_dim:
            raise CarraraError(f"text encoder gives {text_encoder.dim}-dim states but the U-Net expects "
                               f"{unet.config.cross_attention_dim}")
        schedule = NoiseSchedule.from_diffusers_config(folder.scheduler_config)
        upsampler = None  # a cascade folder holds its second stage beside unet/ and vae/
        if (folder.root / "upsampler" / "model_index.json").is_file():
            upsampler = Upsampler.load(folder.root / "upsampler", allow_pickle=allow_pickle)
            if upsampler.unet.config.cross_attention_dim != text_encoder.dim:
                raise CarraraError(f"{folder.root / 'upsampler'} expects {upsampler.unet.config.cross_attention_dim}-dim "
                                   f"text states but the text encoder gives {text_encoder.dim}")
        return cls(unet=unet, vae=vae, text_encoder=text_encoder, schedule=schedule,
                   model_hash=folder.unet_hash(allow_pickle=allow_pickle), name=str(path),
                   scheduler_options=SchedulerOptions.from_scheduler_config(folder.scheduler_config),
                   precision=precision, upsampler=upsampler)

    def latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The image sides this model makes: the base's, and the upsampler's when it is a cascade."""
        base = self.unet.config.sample_size * self.vae.config.downsample_factor
        return (base,) if self.upsampler is None else (base, base * self.upsampler.factor)

    @torch.inference_mode()
    def __call__(self, prompts: list[str] | str, *, steps: int = DEFAULTS.steps, sampler: str = DEFAULTS.sampler,
                 guidance: float = DEFAULTS.guidance, negative_prompt: str = "", seed: int = 0,
                 callback: Callable | None = None, output: str = "pil", size: int | None = None,
                 upsampler: UpsamplerSettings | None = None):
        """Generate one image per prompt; image i uses seed + i, so any image can be made again alone.

        output: "pil" images, "tensor" (B, 3, H, W) in [−1, 1], or "latent" (B, c, h, w) before decoding.
        size: one of `self.sizes` (default the largest): a cascade runs its upsampler after the base.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not 1 <= len(prompts) <= MAX_BATCH:
            raise CarraraError(f"give between 1 and {MAX_BATCH} prompts, got {len(prompts)}")
        for p in prompts:
            GenerationSettings(p, negative_prompt, steps, sampler, guidance, seed).validate()
        size = self.sizes[-1] if size is None else size
        if size not in self.sizes:
            raise CarraraError(f"this model makes images of side {' or '.join(map(str, self.sizes))}, not {size}")
        cascade = size != self.sizes[0]
        total = steps + (cascade and (upsampler or self.upsampler.settings).steps)
        # 1. Encode the text; the negative prompt ("" = the null condition) is the unconditional branch.
        dtype = self.unet_dtype
        cond = self.condition(prompts)  # states (B, L, D) [, pooled (B, P)]
        uncond = self.condition([negative_prompt] * len(prompts))
        # 2. Initial noise x_T ~ N(0, I) (Algorithm 2, line 1). Image i draws all its randomness — x_T, then the
        # noise of the stochastic samplers — from one generator seeded seed + i: alone or in a batch, same image.
        shape = self.latent_shape()
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        x_T = torch.cat([torch.randn(1, *shape, generator=g) for g in gens])  # (B, c, h, w)
        # 3. Denoise with classifier-free guidance: ε̃ = ε(∅) + w·(ε(c) − ε(∅)).
        model = cfg_model(lambda x, t, c: self.unet(x.to(dtype), t, c[0], class_labels=c[1] if len(c) > 1 else None
                                                    ).float(), cond, uncond, guidance)
        timesteps, options = sampling_plan(sampler, self.schedule, steps, self.scheduler_options)
        decode_cb = None
        if callback is not None:
            def decode_cb(i, t, x_t, x0_hat):
                callback(i, total, lambda: self.decode(x0_hat))
        z0 = SAMPLERS[sampler](model, x_T, self.schedule, timesteps,
                               generator=gens, callback=decode_cb, **options)
        _check_finite(z0, "U-Net")
        if output == "latent":
            return z0  # (B, c, h, w), scaled as the U-Net sees it (diffusers' output_type="latent")
        # 4. Decode the latent into pixels.
        images = _check_finite(self.decode(z0), "decoder")  # (B, 3, H, W) in [-1, 1]
        if cascade:  # 5. The second stage: the small image and the same text → the big image.
            up_cb = None
            if callback is not None:
                def up_cb(i, t, x_t, x0_hat):
                    callback(steps + i, total, lambda: depth_to_space(x0_hat, self.upsampler.factor).clamp(-1, 1))
            images = _check_finite(self.upsampler(images, cond[0], uncond[0], seed=seed, settings=upsampler,
                                                  callback=up_cb), "upsampler")  # (B, 3, fH, fW)
        return images if output == "tensor" else to_pil(images)

    def condition(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """The U-Net's text inputs: token states (B, L, D), and the pooled embedding (B, D) if it takes one."""
        states, mask = self.text_encoder.encode(prompts)  # (B, L, D), (B, L)
        if self.unet.config.class_embed_type is None:
            return (states.to(self.unet_dtype),)
        return states.to(self.unet_dtype), mean_pool(states, mask).to(self.unet_dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, c, h, w) → images (B, 3, H, W) in [-1, 1]."""
        return self.vae.decode(z / self.vae.config.scaling_factor).clamp(-1, 1)
