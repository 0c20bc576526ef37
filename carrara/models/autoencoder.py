"""KL-regularized autoencoder of Rombach et al. (2022) "High-Resolution Image Synthesis with Latent Diffusion Models".

Image x (B, 3, H, W) in [−1, 1] → encoder → moments (B, 2c, H/f, W/f) → q(z|x) = N(mean, diag(exp(logvar)))
→ z (B, c, H/f, W/f) → decoder → x̂. State-dict compatible with diffusers' `AutoencoderKL` (same keys and shapes).
The diffusion model works on z' = (z − shift_factor) · scaling_factor; applying that is the caller's job.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from carrara.models.blocks import Downsample2D, ResnetBlock2D, SpatialSelfAttention, Upsample2D
from carrara.models.config import AutoencoderConfig
from carrara.models.weights import load_into, load_weights, resolve_model_folder, save_folder

_EPS = 1e-6  # GroupNorm ε of every autoencoder layer
_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class DiagonalGaussian:
    """q(z|x) = N(μ, diag σ²) from the encoder's moments, Kingma & Welling (2014) §2.4 / Rombach et al. (2022) §3.1."""

    def __init__(self, moments: torch.Tensor):  # (B, 2c, h, w)
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, c, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ ⊙ ε, ε ~ N(0, I) (the reparameterization trick)."""
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²), summed per sample: (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar, dim=[1, 2, 3])


class _ResnetStack(nn.Module):
    """`num_layers` ResBlocks then an optional resampler (diffusers DownEncoderBlock2D / UpDecoderBlock2D)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, down: bool, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, _EPS)
            for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if down else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)  # (B, Cout, H, W)
        for resample in [*(self.downsamplers or []), *(self.upsamplers or [])]:
            x = resample(x)  # (B, Cout, H/2, W/2) or (B, Cout, 2H, 2W)
        return x


class _MidBlock(nn.Module):
    """ResBlock → spatial self-attention → ResBlock at the lowest resolution (diffusers `UNetMidBlock2D`)."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups, _EPS)] if add_attention else [])
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, None, groups, _EPS) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """x (B, Cin, H, W) → moments (B, 2c, H/f, W/f); LDM encoder (Rombach et al. 2022, Appendix G)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            _ResnetStack(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, down=i < len(ch) - 1, up=False)
            for i in range(len(ch))
        )
        self.mid_block = _MidBlock(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch0, H, W)
        for block in self.down_blocks:
            h = block(h)  # (B, ch_i, H/2^i, W/2^i)
        h = self.mid_block(h)  # (B, ch_last, h, w)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2c, h, w)


class Decoder(nn.Module):
    """z (B, c, h, w) → x̂ (B, Cout, h·f, w·f); the encoder mirrored with one more ResBlock per level."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = _MidBlock(ch[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            _ResnetStack(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, down=False, up=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))  # (B, ch_last, h, w)
        for block in self.up_blocks:
            h = block(h)  # (B, ch_i, ·2, ·2)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, Cout, H, W)


class AutoencoderKL(nn.Module):
    """The KL autoencoder: `encode` → DiagonalGaussian, `decode` → image; diffusers `AutoencoderKL` weights."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) for images x (B, Cin, H, W) in [−1, 1]."""
        moments = self.encoder(x)  # (B, 2c, h, w)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image x̂ (B, Cout, H, W) from an unscaled latent z (B, c, h, w)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Reconstruction x̂ = decode(z), z a sample of q(z|x) or (default) its mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, allow_pickle: bool = False) -> AutoencoderKL:
        """Load a diffusers-layout folder (`config.json` + safetensors), or a pipeline folder's `vae/`."""
        folder = resolve_model_folder(folder, "vae")
        model = cls(AutoencoderConfig.from_diffusers_config(folder))
        state_dict = {_rename_deprecated_attention(k): v for k, v in load_weights(folder, allow_pickle=allow_pickle).items()}
        load_into(model, state_dict, str(folder))
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `config.json` + `diffusion_pytorch_model.safetensors` (diffusers layout), atomically."""
        save_folder(folder, self.config.to_diffusers_config(), self.state_dict())


def _rename_deprecated_attention(key: str) -> str:
    """Old diffusers checkpoints name the mid-block attention `query/key/value/proj_attn`; map to `to_q/...`."""
    parts = key.split(".")
    if len(parts) >= 2 and "attentions" in parts and parts[-2] in _DEPRECATED_ATTENTION_NAMES:
        parts[-2] = _DEPRECATED_ATTENTION_NAMES[parts[-2]]
    return ".".join(parts)
