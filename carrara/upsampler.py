"""The cascade's second stage: a text-conditioned diffusion upsampler, small image → image `factor`× bigger.

Cascaded Diffusion Models (Ho et al. 2021) and Imagen (Saharia et al. 2022, §2.4–2.5): a U-Net generates the
high-resolution image conditioned on the low-resolution one (concatenated to its input, upsampled) and on the
text. Noise-conditioning augmentation (CDM §4.2, Imagen §2.5): in training the low-resolution image is corrupted
by the forward process q(y_s | y) at a random level s, and s is an input of the network; at sampling, a fixed s
is chosen, so the stage forgives the base model's artefacts instead of copying them.

It generates the *residual* over a bicubic enlargement, scaled to unit variance (SRDiff, Li et al. 2022; the
latent scale factor of Rombach et al. 2022 §4.3.2 applied to the residual): x_0 = (x − bicubic(y)) / k. The
residual is zero on flat regions and lives at edges, so the network's errors, which in plain pixel space were left
as coloured speckle after 1,000 steps, are k ≈ 0.07 times as large in the image, and an untrained stage is already
bicubic (docs/decisions.md, 2026-11-30: x̂0 error at t = 100 fell 0.018 → 0.0003 on an overfit probe).

It works in pixel space, made cheap by a space-to-depth stem (Hoogeboom et al. 2023, "simple diffusion"): the
(B, 3, f·h, f·w) image is denoised as a (B, 3·f², h, w) tensor, so the U-Net runs at the low resolution and the
low-resolution image (B, 3, h, w) is concatenated channel-wise as it is, with no resampling and no autoencoder
ceiling (docs/decisions.md says why not a latent upsampler, with the measurement).

    y (B, 3, h, w) ─ q(y_s | y) ─┐
    x_t (B, 3f², h, w) ──────────┴─ cat ─► U-Net(·, t, text, class_labels=s) ─► v̂ ─► sampler ─► x_0 (residual / k)
    image = depth-to-space(s2d(bicubic(y)) + k · x_0)   (B, 3, fh, fw)
"""
from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from carrara.diffusion.guidance import cfg_model
from carrara.diffusion.samplers import SAMPLERS, default_timesteps
from carrara.diffusion.schedule import NoiseSchedule, add_noise
from carrara.diffusion.settings import DEFAULTS
from carrara.errors import CarraraError
from carrara.fileio import ensure_dir, write_json_atomic
from carrara.images import to_model_range
from carrara.modelfolder import read_json_object, weights_hash
from carrara.models.codec import depth_to_space, space_to_depth
from carrara.models.unet import UNet2DConditionModel as UNet

KIND = "CarraraUpsampler"  # model_index.json _class_name of an upsampler folder
FOLDER = "upsampler"  # a cascade's second stage, beside the base's unet/ and vae/


@dataclass
class UpsamplerSettings:
    """How the stage samples; the defaults are recorded in its folder and in every PNG."""

    steps: int = 10
    sampler: str = DEFAULTS.sampler
    guidance: float = 1.0  # w = 1: one network pass per step (the text is a weak hint here; the image leads)
    aug_level: int = 100  # s: the forward-process step the low-resolution image is noised to (of T)


def downsample(images: torch.Tensor, f: int) -> torch.Tensor:
    """The low-resolution image the stage is conditioned on: f×f box averages (B, 3, H/f, W/f)."""
    return F.avg_pool2d(images, f)


def bicubic(images: torch.Tensor, f: int) -> torch.Tensor:
    """(B, 3, h, w) in [−1, 1] → (B, 3, fh, fw): torch's bicubic ×f, clamped (it overshoots at edges). The stage's
    reference, its training grids' and bench/cascade.py's baseline row."""
    return F.interpolate(images.float(), scale_factor=f, mode="bicubic", align_corners=False).clamp(-1, 1)


def bicubic_reference(lowres: torch.Tensor, f: int) -> torch.Tensor:
    """The residual's reference: `bicubic` ×f of the clean low-resolution image, space-to-depth (B, 3f², h, w)."""
    return space_to_depth(bicubic(lowres, f), f)


def residual_std(images: torch.Tensor, f: int, chunk: int = 256) -> float:
    """The standard deviation of x − bicubic(downsample(x)) over images (N, 3, H, W), uint8 or in [−1, 1]: the
    stage's k, computed a chunk at a time (a whole 128-px dataset in float would be ~0.75 GB). Measured on the clean
    small images, also for a stage trained on degraded ones (k is a fixed scale, not a fit)."""
    total, n = 0.0, 0
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk]
        x = to_model_range(x) if x.dtype == torch.uint8 else x.float()
        r = space_to_depth(x, f) - bicubic_reference(downsample(x, f), f)
        total, n = total + r.pow(2).sum().item(), n + r.numel()
    return (total / max(n, 1)) ** 0.5


@torch.no_grad()
def autoencoder_round_trip(codec, images: torch.Tensor, chunk: int = 64, progress: bool = False) -> torch.Tensor:
    """D(E(y)) of small images (N, 3, h, w) in [−1, 1], the posterior mean decoded, float16 (N, 3, h, w).

    A latent base model's images are decodes of its latents, so they carry its autoencoder's losses (thin lines
    become blobs, small text smears); a stage trained only on clean box-downsampled images copies those losses
    into the big image. Trained on the round trip instead it learns to undo them — the degradation a cascade stage
    must forgive is its base's (CDM, Ho et al. 2021 §4.1, augment the conditioning with the base's kind of error)."""
    from tqdm.auto import tqdm  # only here: the module is otherwise light to import

    out = []
    for i in tqdm(range(0, len(images), chunk), desc="autoencoder round trip", disable=not progress, leave=False):
        y = images[i:i + chunk].float()
        out.append(codec.decode(codec.encode(y).mode()).clamp(-1, 1).half())
    return torch.cat(out) if out else images.new_zeros(0, *images.shape[1:], dtype=torch.float16)


def residual_target(high: torch.Tensor, lowres: torch.Tensor, f: int, k: float | None) -> torch.Tensor:
    """What the network denoises: high-resolution images (B, 3, fh, fw) and their clean small images → x_0
    (B, 3f², h, w) = (s2d(x) − s2d(bicubic(y))) / k; with k None (folders before the residual), s2d(x)."""
    x = space_to_depth(high, f)
    return x if k is None else (x - bicubic_reference(lowres, f)) / k


def residual_image(x0: torch.Tensor, reference: torch.Tensor | None, f: int, k: float | None) -> torch.Tensor:
    """The inverse of `residual_target`: x_0 (B, 3f², h, w) and s2d(bicubic(y)) → images (B, 3, fh, fw) in [−1, 1]."""
    x = x0 if k is None else reference + k * x0
    return depth_to_space(x, f).clamp(-1, 1)


def upsampler_inputs(unet: UNet, x: torch.Tensor, t: torch.Tensor, lowres_aug: torch.Tensor, states: torch.Tensor,
                     level: torch.Tensor) -> torch.Tensor:
    """The network call of both training and sampling: ε/v̂(cat[x_t, y_s], t, text, s)."""
    return unet(torch.cat([x, lowres_aug.to(x.dtype)], dim=1), t, states, class_labels=level)  # (B, 3f², h, w)


MODEL_PARTS = ("model_index.json", "unet", "vae", "scheduler", "text_encoder", "tokenizer")
TRAINING_FILES = ("config.json", "log.txt", "metrics.jsonl", "loss.png")  # a run's record of how it was made


def training_records(base: str | Path) -> dict[str, Path]:
    """The runs a base model folder was made by: {"diffusion": base}, and when its U-Net started from another run's
    weights (`init_unet`: a second phase, such as a recipe's [finetune]) that run too, as "diffusion-init"."""
    base = Path(base)
    records = {"diffusion": base}
    try:
        init = json.loads((base / "config.json").read_text()).get("init_unet", "")
    except (OSError, ValueError):
        init = ""
    if init and (Path(init) / "log.txt").is_file():
        records["diffusion-init"] = Path(init)
    return records


def assemble_cascade(base: str | Path, upsampler: str | Path, out: str | Path) -> Path:
    """A cascade model folder: the base model folder's parts, with the upsampler folder beside them as upsampler/,
    and each stage's training record (a run's recipe, log, metrics, loss curve) under training/STAGE/.

    Written into a temporary folder and renamed, so `out` is complete or absent."""
    base, upsampler, out = Path(base), Path(upsampler), Path(out)
    for folder, name in ((base, "base model"), (upsampler, "upsampler")):
        if not (folder / "model_index.json").is_file():
            raise CarraraError(f"{folder} is not a {name} folder (no model_index.json)")
    if out.exists():
        raise CarraraError(f"{out} already exists; remove it or pick another --out")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for part in MODEL_PARTS:
        src = base / part
        if src.is_dir():
            shutil.copytree(src, tmp / part)
        elif src.is_file():
            shutil.copy2(src, tmp / part)
    (tmp / "upsampler").mkdir()
    for part in ("model_index.json", "unet", "scheduler"):
        src = upsampler / part
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / "upsampler" / part)
    for stage, run in {**training_records(base), "upsampler": upsampler}.items():  # how each stage was made
        if (run / "log.txt").is_file():
            (tmp / "training" / stage).mkdir(parents=True)
            for name in TRAINING_FILES:
                if (run / name).is_file():
                    shutil.copy2(run / name, tmp / "training" / stage / name)
    tmp.rename(out)
    return out


class Upsampler:
    """A U-Net that denoises (B, 3f², h, w) given the low-resolution image, the text and the augmentation level."""

    def __init__(self, *, unet: UNet, schedule: NoiseSchedule, factor: int, settings: UpsamplerSettings | None = None,
                 residual_scale: float | None = None, degrade: str = ""):
        c = unet.config
        if c.class_embed_type != "timestep" or c.in_channels != 3 * factor**2 + 3 or c.out_channels != 3 * factor**2:
            raise CarraraError(f"this U-Net is not a ×{factor} upsampler (needs class_embed_type='timestep', "
                               f"{3 * factor**2 + 3} input and {3 * factor**2} output channels)")
        self.unet, self.schedule, self.factor = unet.eval(), schedule, factor  # schedule.prediction_type: ε or v
        self.settings = settings or UpsamplerSettings()
        if residual_scale is not None and not residual_scale > 0:
            raise CarraraError(f"upsampler residual_scale must be > 0, got {residual_scale}")
        self.residual_scale = residual_scale  # k: x_0 is (x − bicubic(y)) / k; None: x_0 is x (folders before it)
        self.degrade = degrade  # what its training did to y: "" clean, "autoencoder": the base's round trip
        self._unet_dir: Path | None = None  # where `load` read the weights: `weights_hash` names them
        self._allow_pickle = False

    @functools.cached_property
    def weights_hash(self) -> str:
        """First 12 hex digits of its U-Net file's SHA-256 ("" when not loaded from a folder); hashed on first use,
        so loading a cascade for a 64-px image reads no more than before."""
        return "" if self._unet_dir is None else weights_hash(self._unet_dir, allow_pickle=self._allow_pickle)

    @classmethod
    def load(cls, folder: str | Path, *, allow_pickle: bool = False) -> Upsampler:
        folder = Path(folder)
        index = read_json_object(folder / "model_index.json")
        if index.get("_class_name") != KIND:
            raise CarraraError(f"{folder} is not an upsampler folder (model_index.json _class_name is not {KIND})")
        scheduler = read_json_object(folder / "scheduler" / "scheduler_config.json")
        own = index.get("carrara", {})
        try:
            factor = int(own.get("factor", 2))
            settings = UpsamplerSettings(**own.get("settings", {}))
            residual_scale = None if own.get("residual_scale") is None else float(own["residual_scale"])
            degrade = str(own.get("degrade", ""))
        except (TypeError, ValueError) as e:
            raise CarraraError(f"{folder / 'model_index.json'}: bad upsampler settings ({e})") from None
        unet = UNet.from_pretrained(folder / "unet", allow_pickle=allow_pickle)
        stage = cls(unet=unet, schedule=NoiseSchedule.from_diffusers_config(scheduler), factor=factor,
                    settings=settings, residual_scale=residual_scale, degrade=degrade)
        stage._unet_dir, stage._allow_pickle = folder / "unet", allow_pickle
        return stage

    def save(self, folder: str | Path, *, text_encoder: str) -> None:
        """unet/, scheduler/ and model_index.json (with the factor and the sampling defaults) into `folder`."""
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet")
        ensure_dir(folder / "scheduler")
        write_json_atomic(folder / "scheduler" / "scheduler_config.json",
                          {"_class_name": "DDIMScheduler", "clip_sample": False, **self.schedule.to_diffusers_config()})
        write_json_atomic(folder / "model_index.json", {
            "_class_name": KIND, "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "carrara": {"text_encoder": text_encoder, "factor": self.factor, "residual_scale": self.residual_scale,
                        "degrade": self.degrade, "settings": self.settings.__dict__}})

    def target(self, high: torch.Tensor, lowres: torch.Tensor) -> torch.Tensor:
        """x_0 (B, 3f², h, w) of high-resolution images (B, 3, fh, fw) and their small images (`residual_target`)."""
        return residual_target(high, lowres, self.factor, self.residual_scale)

    def pixels(self, x0: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        """Images (B, 3, fh, fw) of x_0 (B, 3f², h, w) over s2d(bicubic(y)) (`residual_image`)."""
        return residual_image(x0, reference, self.factor, self.residual_scale)

    @torch.inference_mode()
    def __call__(self, lowres: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, *, seed: int = 0,
                 settings: UpsamplerSettings | None = None, callback=None) -> torch.Tensor:
        """Low-resolution images (B, 3, h, w) in [−1, 1] and text states (B, L, D) → images (B, 3, fh, fw)."""
        s = settings or self.settings
        if not 0 <= s.aug_level < self.schedule.T:
            raise CarraraError(f"upsampler aug_level must be in [0, {self.schedule.T - 1}], got {s.aug_level}")
        B, f = lowres.shape[0], self.factor
        dtype = next(self.unet.parameters()).dtype
        # 1. Noise-conditioning augmentation at the chosen level s: y_s ~ q(y_s | y) (CDM §4.2).
        gens = [torch.Generator().manual_seed(seed + i) for i in range(B)]  # image i depends on seed + i only
        level = torch.full((B,), s.aug_level, dtype=torch.long)
        y_noise = torch.cat([torch.randn(1, *lowres.shape[1:], generator=g) for g in gens])
        lowres_aug = add_noise(self.schedule, lowres.float(), y_noise, level)  # (B, 3, h, w)
        # 2. x_T ~ N(0, I) in the space-to-depth layout, then the usual denoising loop.
        shape = (3 * f * f, *lowres.shape[-2:])
        x_T = torch.cat([torch.randn(1, *shape, generator=g) for g in gens])  # (B, 3f², h, w)

        def net(x, t, c):
            n = x.shape[0] // B  # 2 under guidance (uncond; cond), else 1
            return upsampler_inputs(self.unet, x.to(dtype), t, lowres_aug.repeat(n, 1, 1, 1), c.to(dtype),
                                    level.repeat(n)).float()

        model = cfg_model(net, cond, uncond, s.guidance)
        timesteps = default_timesteps(s.sampler, self.schedule, s.steps)
        reference = None if self.residual_scale is None else bicubic_reference(lowres, f)  # of the clean y
        step_cb = callback and (lambda i, t, x_t, x0_hat: callback(i, t, x_t, self.pixels(x0_hat, reference)))
        x0 = SAMPLERS[s.sampler](model, x_T, self.schedule, timesteps,
                                 generator=gens, callback=step_cb)  # image i's stream goes on: x_T, then noise
        return self.pixels(x0, reference)  # (B, 3, fh, fw)
