"""What the diffusion model generates — the intermediate product — is a latent or a small image (seeds/001).

The KL autoencoder (autoencoder.py) makes it a latent: Stable Diffusion's route (Rombach et al. 2022). The pixel
codec makes it the image itself: Imagen's route (Saharia et al. 2022 §2), a pixel-space base whose small image a
diffusion upsampler enlarges (carrara/upsampler.py). The codec stands where the autoencoder stands, with the
same `encode` → posterior and `decode` → image, so training, sampling, evaluation and the cascade run unchanged:

    x (B, 3, H, W) ─ space_to_depth(f) ─► z (B, 3f², H/f, W/f) ─ depth_to_space(f) ─► x   (exact, no parameters)

f = 1 is the image as it is; f = 2 lets the U-Net run at half the side on 12 channels, the "simple diffusion"
stem (Hoogeboom et al. 2023). `load_codec` reads a model folder's vae/ of either kind by its `_class_name`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from carrara.errors import CarraraError
from carrara.fileio import ensure_dir, write_json_atomic
from carrara.models.autoencoder import AutoencoderKL
from carrara.models.config import CONFIG_NAME, AutoencoderConfig, DiffusersConfig, _check_types, _read_config_dict
from carrara.models.weights import resolve_model_folder

PIXELS = "pixels"  # `--autoencoder pixels[:F]`: train in pixel space, the codec of factor F (default 1)
MAX_FACTOR = 8


def space_to_depth(x: torch.Tensor, f: int) -> torch.Tensor:
    """(B, C, f·h, f·w) → (B, C·f², h, w), lossless (torch's pixel_unshuffle)."""
    return F.pixel_unshuffle(x, f)


def depth_to_space(x: torch.Tensor, f: int) -> torch.Tensor:
    """(B, C·f², h, w) → (B, C, f·h, f·w), the inverse of `space_to_depth`."""
    return F.pixel_shuffle(x, f)


@dataclass
class PixelCodecConfig(DiffusersConfig):
    """The pixel codec's `config.json`: the fields the pipeline and trainer read from an autoencoder's config."""

    _class_name = "CarraraPixelCodec"

    factor: int = 1
    scaling_factor: float = 1.0  # pixels in [−1, 1] already have unit scale (Imagen, DDPM)

    def __post_init__(self):
        _check_types(self, int_pos=("factor",), number=("scaling_factor",))
        if self.factor > MAX_FACTOR or self.scaling_factor <= 0:
            raise CarraraError(f"{self._class_name} config: factor must be in [1, {MAX_FACTOR}] and scaling_factor "
                               f"positive, got factor={self.factor}, scaling_factor={self.scaling_factor}")

    @property
    def downsample_factor(self) -> int:
        return self.factor

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor**2


class PointMass:
    """q(z|x) = δ(z − space_to_depth(x)): the posterior of a codec that learns nothing, shaped like DiagonalGaussian."""

    def __init__(self, mean: torch.Tensor):  # (B, 3f², h, w)
        self.mean = mean
        self.std = torch.zeros_like(mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """No regulariser: the codec is fixed, there is nothing for a KL term to shape. (B,) zeros."""
        return torch.zeros(self.mean.shape[0], dtype=self.mean.dtype, device=self.mean.device)


class PixelCodec(nn.Module):
    """The parameter-free first stage of pixel-space diffusion: `encode` → PointMass, `decode` → image, exact."""

    def __init__(self, config: PixelCodecConfig | None = None):
        super().__init__()
        self.config = config or PixelCodecConfig()

    def encode(self, x: torch.Tensor) -> PointMass:
        """Images (B, 3, H, W) in [−1, 1] → the point posterior at (B, 3f², H/f, W/f)."""
        f = self.config.factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise CarraraError(f"the pixel codec of factor {f} needs image sides divisible by {f}, "
                               f"got {tuple(x.shape[-2:])}")
        return PointMass(space_to_depth(x, f))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 3f², h, w) → images (B, 3, fh, fw)."""
        return depth_to_space(z, self.config.factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).mode())

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, allow_pickle: bool = False) -> PixelCodec:
        """Read `config.json` (there are no weights); `allow_pickle` is accepted for load_codec's one signature."""
        return cls(PixelCodecConfig.from_diffusers_config(resolve_model_folder(folder, "vae")))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `config.json` alone, atomically."""
        write_json_atomic(ensure_dir(folder) / CONFIG_NAME, self.config.to_diffusers_config())


CODECS = {AutoencoderConfig._class_name: (AutoencoderKL, AutoencoderConfig),
          PixelCodecConfig._class_name: (PixelCodec, PixelCodecConfig)}


def _codec_class(folder: str | os.PathLike) -> tuple[type, type]:
    folder = resolve_model_folder(folder, "vae")
    name = _read_config_dict(folder).get("_class_name", AutoencoderConfig._class_name)
    if name not in CODECS:
        raise CarraraError(f"{folder / CONFIG_NAME}: _class_name {name!r} is not a first stage carrara knows "
                           f"({', '.join(CODECS)})")
    return CODECS[name]


def load_codec(folder: str | os.PathLike, *, allow_pickle: bool = False) -> AutoencoderKL | PixelCodec:
    """The first stage in a model folder's vae/ (or that folder itself): a KL autoencoder or the pixel codec."""
    model_cls, _ = _codec_class(folder)
    return model_cls.from_pretrained(folder, allow_pickle=allow_pickle)


def codec_config(folder: str | os.PathLike) -> AutoencoderConfig | PixelCodecConfig:
    """The config of the first stage in `folder`, read without its weights."""
    _, config_cls = _codec_class(folder)
    return config_cls.from_diffusers_config(resolve_model_folder(folder, "vae"))


def pixel_factor(spec: str) -> int | None:
    """F for an autoencoder spec "pixels" (1) or "pixels:F"; None for anything else (a run folder)."""
    if spec != PIXELS and not spec.startswith(PIXELS + ":"):
        return None
    text = spec.partition(":")[2] if ":" in spec else "1"
    if not text.isdigit() or not 1 <= int(text) <= MAX_FACTOR:
        raise CarraraError(f"autoencoder {spec!r}: pixel space is 'pixels' or 'pixels:F' with F in 1..{MAX_FACTOR}")
    return int(text)
