"""Text → image: encode the prompt, start from noise, denoise with guidance, decode (Rombach et al. 2022, Fig. 3);
a cascade then runs its upsampler on the small image (Ho et al. 2021; carrara/upsampler.py). Given an init image
the same loop edits it: img2img (SDEdit) and inpainting (RePaint's blending), diffusion/editing.py.

The denoising loop is written out once, in `Pipeline.__call__`, and training's sample grids use it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from carrara.diffusion.consistency import STUDENT_STEPS
from carrara.diffusion.editing import blend_known, check_strength, latent_mask, noise_to, truncate_plan
from carrara.diffusion.guidance import ClassifierGuidance, cfg_model
from carrara.diffusion.objectives import VarianceType
from carrara.diffusion.samplers import SAMPLERS, SchedulerOptions, alpha_bar_at, sampling_plan
from carrara.diffusion.schedule import NoiseSchedule
from carrara.diffusion.settings import DEFAULTS, GenerationSettings
from carrara.errors import CarraraError
from carrara.hardware import cpu_supports_bf16, keep_freed_memory
from carrara.images import from_pil, to_pil
from carrara.modelfolder import read_json_object, resolve
from carrara.models import int8
from carrara.models.blocks import guidance_embedding, text_kv_cache
from carrara.models.classifier import NoiseAwareClassifier
from carrara.models.codec import load_codec
from carrara.models.compiled import Package, find_package
from carrara.models.unet import UNet2DConditionModel as UNet
from carrara.student import FOLDER as STUDENT_FOLDER
from carrara.student import has_student, load_student, student_record
from carrara.text.encoder import TextEncoder, mean_pool
from carrara.unclip import Unclip, is_unclip
from carrara.upsampler import FOLDER as UPSAMPLER_FOLDER
from carrara.upsampler import Upsampler, UpsamplerSettings

MAX_BATCH = 64
# diffusers' defaults: StableDiffusionImg2ImgPipeline strength=0.8, StableDiffusionInpaintPipeline strength=1.0
IMG2IMG_STRENGTH, INPAINT_STRENGTH = 0.8, 1.0
PRECISIONS = ("auto", "fp32", "bf16", "int8")


def resolve_precision(precision: str) -> str:
    """"auto" → "bf16" where the CPU has native bf16 dot products (docs/performance.md measures both), else "fp32"
    (which `Pipeline.load` makes "int8" where the model has a calibration of its weights)."""
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


def load_classifier(run: str | Path, schedule: NoiseSchedule) -> NoiseAwareClassifier:
    """A `carrara train classifier` run (or its classifier/ folder) to guide a model with `schedule`: refused in one
    line when it learned another noise schedule (its x_t would not be the model's)."""
    classifier = NoiseAwareClassifier.from_pretrained(run)
    folder = Path(run) / "classifier" if (Path(run) / "classifier").is_dir() else Path(run)
    trained = NoiseSchedule.from_diffusers_config(read_json_object(folder / "scheduler_config.json"))
    if trained.T != schedule.T or not torch.allclose(trained.alphas_cumprod, schedule.alphas_cumprod):
        raise CarraraError(f"--classifier {run} learned the {trained.kind.value} noise schedule, the model uses "
                           f"{schedule.kind.value}: train it with --set schedule={schedule.kind.value}")
    return classifier


@dataclass
class EditInputs:
    """What img2img and inpainting start from."""

    image: torch.Tensor  # (B, 3, S, S) the init image at the output side, in [−1, 1]
    z0: torch.Tensor  # (B, c, h, w) its latent at the base's side, scaled as the U-Net sees it
    mask: torch.Tensor | None  # (B, 1, S, S) 1 = regenerate, at the output side
    latent_mask: torch.Tensor | None  # (B, 1, h, w) the same on the latent grid (diffusion/editing.py)


def _as_batch(images, batch: int, what: str, side: int, *, mask: bool) -> torch.Tensor:
    """PIL image(s) or a tensor → (batch, C, side, side): one picture serves every prompt, or one per prompt."""
    if torch.is_tensor(images):
        if images.dim() != 4 or images.shape[1] != (1 if mask else 3):
            raise CarraraError(f"the {what} tensor must be (B, {1 if mask else 3}, H, W), got {tuple(images.shape)}")
        x = images.float()
        if x.shape[-1] != side or x.shape[-2] != side:
            x = torch.nn.functional.interpolate(x, size=(side, side), mode="nearest" if mask else "bicubic",
                                                antialias=not mask)
        x = (x > 0.5).float() if mask else x.clamp(-1, 1)
    else:
        x = from_pil([images] if isinstance(images, Image.Image) else list(images), side, mask=mask)
    if x.shape[0] not in (1, batch):
        raise CarraraError(f"give one {what} or one per prompt ({batch}), got {x.shape[0]}")
    return x.expand(batch, -1, -1, -1).contiguous()


class Pipeline:
    """A text encoder, a U-Net noise predictor, a noise schedule and an autoencoder's decoder."""

    def __init__(self, *, unet, vae, text_encoder, schedule: NoiseSchedule, model_hash: str = "", name: str = "",
                 scheduler_options: SchedulerOptions | None = None, precision: str = "fp32",
                 upsampler: Upsampler | None = None, student: dict | None = None, unclip: Unclip | None = None):
        self.unet, self.vae, self.text_encoder = unet.eval(), vae.eval(), text_encoder
        self.unclip = unclip  # unCLIP: the U-Net is a decoder conditioned on CLIP image embeddings (carrara/unclip.py)
        # a distilled student (train/distill.py) has its guidance built in: one U-Net call per step, no CFG pair.
        # Its record (model_index.json "carrara"."student"); a U-Net with a guidance embedding is one in any case.
        self.student = student or ({"method": "lcm"} if unet.config.time_cond_proj_dim is not None else None)
        self.upsampler = upsampler  # the cascade's second stage (carrara/upsampler.py), or None
        self.schedule = schedule  # ᾱ_t and what the U-Net predicts (schedule.prediction_type)
        self.scheduler_options = scheduler_options or SchedulerOptions()
        self.model_hash, self.name = model_hash, name
        self.precision = resolve_precision(precision)
        if self.precision == "int8" and not int8.is_int8(self.unet):
            raise CarraraError("precision int8 needs a U-Net quantized by models/int8.py (Pipeline.load does it)")
        # bf16 weights (not autocast: no per-step casts of the weights) for the U-Net, which does ~all the work;
        # the sampler's state, the guidance sum, the text encoder and the decoder stay fp32.
        self.unet_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        if self.precision == "bf16" and next(self.unet.parameters()).dtype != torch.bfloat16:
            self.unet = self.unet.to(torch.bfloat16)
        if upsampler is not None:
            upsampler.unet.to(self.unet_dtype)
        self.compiled: Package | None = None  # `carrara compile`'s package of this U-Net (models/compiled.py)
        self.loras: list[dict] = []  # LoRA adapters merged into the U-Net (merge_loras)
        self.unet_dir: Path | None = None  # the U-Net's folder, when loaded from one (Pipeline.load)

    @classmethod
    def load(cls, path: str | Path = "default", *, allow_pickle: bool = False, precision: str = "auto",
             fast: bool = False, auto_int8: bool = True) -> Pipeline:
        """Load a carrara run folder, the packaged "default" model, or a diffusers SD folder.

        Weights are read from safetensors only, unless allow_pickle lets `.bin` files be read weights-only.
        precision: "fp32", "bf16" (U-Net weights in bf16), "int8" (W8A8 U-Net with the calibration `carrara quantize`
        stored beside its weights, models/int8.py; a cascade's upsampler too where it has one) or "auto": bf16 where
        the CPU has native bf16; else int8 where the U-Net has a calibration of these weights (the packaged models
        ship theirs) and `auto_int8` (False for weights about to change: a LoRA merge); else fp32.
        fast: sample with the few-step student the folder holds (carrara/student.py; a student run already is one)."""
        auto, precision = precision == "auto", resolve_precision(precision)
        keep_freed_memory()
        unclip = Unclip.load(path) if is_unclip(path) else None  # an unCLIP folder: its decoder/ is the model
        folder = resolve(unclip.decoder if unclip else path)
        unet = UNet.from_pretrained(folder.unet, allow_pickle=allow_pickle)
        if unclip is not None:
            unclip.check(unet)
        vae = load_codec(folder.vae, allow_pickle=allow_pickle)  # a KL autoencoder, or the pixel codec
        text_encoder = TextEncoder.load(folder.text_encoder, tokenizer_path=folder.tokenizer, allow_pickle=allow_pickle)
        if text_encoder.dim != unet.config.cross_attention_dim:
            raise CarraraError(f"text encoder gives {text_encoder.dim}-dim states but the U-Net expects "
                               f"{unet.config.cross_attention_dim}")
        scheduler_config, unet_dir = folder.scheduler_config, folder.unet
        student = student_record(folder.root)  # a student run's own record, or None
        model_hash = folder.unet_hash(allow_pickle=allow_pickle)
        if fast and student is None:  # the student beside its teacher: its weights are a delta of these
            if not has_student(folder.root):
                raise CarraraError(f"{path} has no few-step student: make one with carrara distill, then put it "
                                   f"beside its teacher with carrara export student --student RUN --model {path}")
            unet, student, scheduler_config, model_hash = load_student(folder.root, unet, model_hash)
            unet_dir = folder.root / STUDENT_FOLDER / "unet"
        schedule = NoiseSchedule.from_diffusers_config(scheduler_config)
        VarianceType.of_model(scheduler_config, unet.config.in_channels, unet.config.out_channels)
        upsampler = None  # a cascade folder holds its second stage beside unet/ and vae/
        if (folder.root / UPSAMPLER_FOLDER / "model_index.json").is_file():
            upsampler = Upsampler.load(folder.root / UPSAMPLER_FOLDER, allow_pickle=allow_pickle)
            if upsampler.unet.config.cross_attention_dim != text_encoder.dim:
                raise CarraraError(f"{folder.root / 'upsampler'} expects {upsampler.unet.config.cross_attention_dim}-dim "
                                   f"text states but the text encoder gives {text_encoder.dim}")
        calibration = int8.calibrated(unet_dir, model_hash) if auto and precision == "fp32" and auto_int8 else None
        if calibration is not None:
            precision = "int8"  # no native bf16: int8 is this CPU's fast path (docs/performance.md), fp32 by asking
        if precision == "int8":  # the student beside its teacher has its own calibration, in student/unet/
            unet = int8.quantize_unet(unet, calibration or int8.read_calibration(unet_dir, model_hash,
                                                                                 f"{path}{' --fast' if fast else ''}"))
            up_dir = folder.root / UPSAMPLER_FOLDER / "unet"  # without a calibration the upsampler stays fp32;
            if upsampler is not None and (up_dir / int8.CALIBRATION_FILE).exists():  # a stale one is refused
                int8.quantize_unet(upsampler.unet, int8.read_calibration(up_dir, upsampler.weights_hash, str(path)))
        pipe = cls(unet=unet, vae=vae, text_encoder=text_encoder, schedule=schedule, model_hash=model_hash,
                   name=str(path),
                   scheduler_options=SchedulerOptions.from_scheduler_config(scheduler_config),
                   precision=precision, upsampler=upsampler, student=student,
                   unclip=unclip)
        pipe.compiled = find_package(unet_dir, model_hash, pipe.precision, pipe.unet)
        pipe.unet_dir = unet_dir  # where its weights' companions live: the int8 calibration, compiled packages
        return pipe

    def merge_loras(self, specs: list[str]) -> list[dict]:
        """Merge LoRA adapters (models/lora.py's "FILE[:SCALE]") into the U-Net; the compiled package holds the
        weights without them, so it is set aside. Returns (and keeps in `loras`) what the PNGs record."""
        from carrara.models.lora import apply_loras

        if self.precision == "int8":
            raise CarraraError("--lora merges into fp32 weights and the int8 calibration is for the model's own: use "
                               "--precision fp32 with --lora")
        self.loras = apply_loras(self.unet, specs)
        self.compiled = None
        return self.loras

    @property
    def defaults(self) -> dict:
        """The sampling settings this model is made for when the user names none: a student's few consistency steps
        (Luo et al. 2023), else the defaults of diffusion/settings.py."""
        return {"steps": STUDENT_STEPS, "sampler": "lcm"} if self.student else {}

    @property
    def sampling(self) -> dict:
        """Steps, sampler and guidance of a run that names none: diffusion/settings.py's, then the model's own."""
        return {"steps": DEFAULTS.steps, "sampler": DEFAULTS.sampler, "guidance": DEFAULTS.guidance, **self.defaults}

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
                 upsampler: UpsamplerSettings | None = None, init_image=None, strength: float | None = None,
                 mask=None, classifier: ClassifierGuidance | None = None, image_embeds: torch.Tensor | None = None,
                 prior_guidance: float | None = None, same_noise: bool = False):
        """Generate one image per prompt; image i uses seed + i, so any image can be made again alone.

        output: "pil" images, "tensor" (B, 3, H, W) in [−1, 1], or "latent" (B, c, h, w) before decoding.
        size: one of `self.sizes` (default the largest): a cascade runs its upsampler after the base.
        init_image: edit this picture instead of starting from noise (img2img): a PIL image, one per prompt, or a
            tensor (B, 3, H, W) in [−1, 1]; it is centre-cropped and resized to the base's side. strength ∈ (0, 1]:
            how much of the sampling plan is run (default 0.8; 1.0 with a mask).
        mask: inpaint: regenerate where the mask is white (≥ 128; a tensor (B, 1, H, W): 1), keep the rest of the
            init image. The kept pixels of the result are the init's own (pasted back after decoding).
        classifier: classifier guidance (Dhariwal & Nichol 2021) on top of the classifier-free one.
        image_embeds: unCLIP only: decode these CLIP image embeddings (B, E) instead of the prior's samples of the
            prompts (variations, interpolation, text diffs); prior_guidance: the prior's own guidance scale.
        same_noise: every image starts from the noise of `seed` (an interpolation strip), not seed + i.
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
        if mask is not None and init_image is None:
            raise CarraraError("a mask needs an init image to inpaint (--init)")
        if init_image is not None:
            strength = (INPAINT_STRENGTH if mask is not None else IMG2IMG_STRENGTH) if strength is None else strength
            check_strength(strength)
        # 1. Encode the text; the negative prompt ("" = the null condition) is the unconditional branch.
        dtype = self.unet_dtype
        if self.student and negative_prompt:
            raise CarraraError("this model is a distilled student with guidance built in: it takes no negative prompt")
        cond = self.condition(prompts)  # states (B, L, D) [, pooled (B, P)]
        uncond = self.condition([negative_prompt] * len(prompts)) if not self.student or cascade else None
        if self.unclip is not None:  # DALL-E 2: z_i (given, or the prior's from the text) joins the text, or is 0
            cond, uncond = self.unclip.conditions(prompts, cond[0], uncond[0], image_embeds, seed=seed,
                                                  prior_guidance=prior_guidance)
        elif image_embeds is not None or prior_guidance is not None:
            raise CarraraError("image embeddings and prior guidance need an unCLIP model (carrara train decoder)")
        # 2. Initial noise x_T ~ N(0, I) (Algorithm 2, line 1). Image i draws all its randomness — x_T, then the
        # noise of the stochastic samplers — from one generator seeded seed + i: alone or in a batch, same image.
        shape = self.latent_shape()
        gens = [torch.Generator().manual_seed(seed + (0 if same_noise else i)) for i in range(len(prompts))]
        x_T = torch.cat([torch.randn(1, *shape, generator=g) for g in gens])  # (B, c, h, w)
        timesteps, options = sampling_plan(sampler, self.schedule, steps, self.scheduler_options)
        edit = None
        if init_image is not None:  # 2'. img2img / inpainting: start part-way, from the init image's latent
            edit = self._edit_inputs(init_image, mask, len(prompts), size)
            noise, timesteps = x_T, truncate_plan(timesteps, strength)
            if not timesteps:  # a strength too small to run one step: the image's own latent
                x_T = edit.z0
            elif len(timesteps) < steps:  # SDEdit's x_{t0}; strength 1 starts from x_T itself, as txt2img
                x_T = noise_to(edit.z0, noise, alpha_bar_at(sampler, self.schedule, timesteps[0]))
            if edit.latent_mask is not None:
                options["after_step"] = blend_known(edit.z0, noise, edit.latent_mask)
        base_steps = len(timesteps)
        total = base_steps + (cascade and (upsampler or self.upsampler.settings).steps)
        # 3. Denoise with classifier-free guidance: ε̃ = ε(∅) + w·(ε(c) − ε(∅)); a student was taught the guided
        # teacher and is told w instead (its embedding joins t's, LCM §4.2): one U-Net call per step.
        w_emb = None
        if self.student:
            w_emb = guidance_embedding(torch.full((len(prompts),), float(guidance)), self.unet.config.time_cond_proj_dim)
        passes = base_steps * len(prompts) * (1 if self.student or guidance == 1.0 else 2)  # image-passes of the U-Net
        compiled = self.compiled.get(passes) if self.compiled is not None and classifier is None else None
        unet = compiled or self.unet
        model = cfg_model(lambda x, t, c: unet(x.to(dtype), t, c[0], class_labels=c[1] if len(c) > 1 else None,
                                               timestep_cond=w_emb).float(), cond, uncond, 1.0 if self.student
                          else guidance)
        if classifier is not None:
            model = classifier.wrap(model, self.schedule, sampler, timesteps)
        decode_cb = None
        if callback is not None:
            def decode_cb(i, t, x_t, x0_hat):
                callback(i, total, lambda: self.decode(x0_hat))
        with text_kv_cache(self.unet):  # the text's keys and values once, not at every step
            z0 = SAMPLERS[sampler](model, x_T, self.schedule, timesteps, generator=gens, callback=decode_cb,
                                   **options) if timesteps else x_T
        _check_finite(z0, "U-Net")
        if output == "latent":
            return z0  # (B, c, h, w), scaled as the U-Net sees it (diffusers' output_type="latent")
        # 4. Decode the latent into pixels.
        images = _check_finite(self.decode(z0), "decoder")  # (B, 3, H, W) in [-1, 1]
        if cascade:  # 5. The second stage: the small image and the same text → the big image.
            up_cb = None
            if callback is not None:
                def up_cb(i, t, x_t, image_hat):  # the stage passes x̂0 as an image (B, 3, fH, fW)
                    callback(base_steps + i, total, lambda: image_hat)
            with text_kv_cache(self.upsampler.unet):
                images = _check_finite(self.upsampler(images, cond[0], uncond[0], seed=seed, settings=upsampler,
                                                      callback=up_cb), "upsampler")  # (B, 3, fH, fW)
        if edit is not None and edit.mask is not None:  # 6. Inpainting: the kept pixels are the init's own
            images = edit.mask * images + (1.0 - edit.mask) * edit.image
        return images if output == "tensor" else to_pil(images)

    def _edit_inputs(self, init_image, mask, batch: int, size: int) -> EditInputs:
        """The init image (and mask) for a batch: at the output side (for the paste), and the base's latent."""
        base = self.sizes[0]
        image = _as_batch(init_image, batch, "init image", size, mask=False)  # (B, 3, size, size)
        small = image if size == base else _as_batch(init_image, batch, "init image", base, mask=False)
        z0 = self.vae.encode(small).mode() * self.vae.config.scaling_factor  # (B, c, h, w): the posterior mean
        if mask is None:
            return EditInputs(image, z0, None, None)
        pixels = _as_batch(mask, batch, "mask", size, mask=True)  # (B, 1, size, size)
        small_mask = pixels if size == base else _as_batch(mask, batch, "mask", base, mask=True)
        return EditInputs(image, z0, pixels, latent_mask(small_mask, self.vae.config.downsample_factor))

    def condition(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """The U-Net's text inputs: token states (B, L, D), and the pooled embedding (B, D) if it takes one."""
        states, mask = self.text_encoder.encode(prompts)  # (B, L, D), (B, L)
        if self.unet.config.class_embed_type is None:
            return (states.to(self.unet_dtype),)
        return states.to(self.unet_dtype), mean_pool(states, mask).to(self.unet_dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, c, h, w) → images (B, 3, H, W) in [-1, 1]."""
        return self.vae.decode(z / self.vae.config.scaling_factor).clamp(-1, 1)
