"""Conditional U-Net noise predictor ε_θ(x_t, t, c) of latent diffusion.

U-Net of Ronneberger et al. (2015) with the diffusion changes of Ho et al. (2020) Appendix B (sinusoidal time
embedding added in every ResBlock, self-attention) and the text cross-attention of Rombach et al. (2022) §3.3.
State-dict compatible with diffusers' `UNet2DConditionModel` for the Stable Diffusion 1.x/2.x family of configs.

    x_t (B, 4, h, w) ─ conv_in ─► down blocks ─► mid block ─► up blocks (+ skip connections) ─ conv_out ─► ε̂
    t ─ sinusoidal ─ MLP ─► temb added in every ResBlock (or its scale and shift: AdaGN, Dhariwal & Nichol 2021);  text states c (B, L, D) ─► cross-attention
    optional class_labels ─ MLP ─► added to temb: a pooled text embedding (B, P) (class_embed_type="projection",
    Imagen §2.2) or a cascade stage's noise-augmentation level (B,) ("timestep", Ho et al. 2021)
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from carrara.models.blocks import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    timestep_embedding,
)
from carrara.models.config import UNetConfig
from carrara.models.weights import load_into, load_weights, resolve_model_folder, save_folder

MASK_BIAS = -10000.0  # score added at masked text tokens (diffusers' value, not −∞: an all-masked row stays finite)


def _transformers(cfg: UNetConfig, channels: int, heads: int, depth: int, count: int) -> nn.ModuleList:
    return nn.ModuleList(
        Transformer2DModel(channels, heads, cfg.cross_attention_dim, cfg.norm_num_groups,
                           cfg.use_linear_projection, depth, cfg.upcast_attention)
        for _ in range(count)
    )


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D / DownBlock2D: ResBlocks (each followed by a spatial transformer if `cross_attention`),
    then a stride-2 convolution; every intermediate output is kept for the skip connections."""

    def __init__(self, cfg: UNetConfig, level: int, temb_channels: int, cross_attention: bool):
        super().__init__()
        ch = cfg.block_out_channels
        in_ch, out_ch, n = ch[max(level - 1, 0)], ch[level], cfg.per_block("layers_per_block")[level]
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_channels, cfg.norm_num_groups, cfg.norm_eps,
                          cfg.dropout, time_scale_shift=cfg.resnet_time_scale_shift)
            for i in range(n)
        )
        heads, depth = cfg.per_block("attention_head_dim")[level], cfg.per_block("transformer_layers_per_block")[level]
        self.attentions = _transformers(cfg, out_ch, heads, depth, n) if cross_attention else None
        is_last = level == len(ch) - 1
        self.downsamplers = None if is_last else nn.ModuleList([Downsample2D(out_ch, cfg.downsample_padding)])

    def forward(self, x, temb, context, bias) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)  # (B, C, H, W)
            if self.attentions is not None:
                x = self.attentions[i](x, context, bias)  # (B, C, H, W)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C, H/2, W/2)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: ResBlock, then (spatial transformer, ResBlock) at the lowest resolution."""

    def __init__(self, cfg: UNetConfig, temb_channels: int):
        super().__init__()
        ch = cfg.block_out_channels[-1]
        self.attentions = _transformers(cfg, ch, cfg.per_block("attention_head_dim")[-1],
                                        cfg.per_block("transformer_layers_per_block")[-1], 1)
        self.resnets = nn.ModuleList(
            ResnetBlock2D(ch, ch, temb_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout,
                          output_scale_factor=cfg.mid_block_scale_factor, time_scale_shift=cfg.resnet_time_scale_shift)
            for _ in range(2)
        )

    def forward(self, x, temb, context, bias) -> torch.Tensor:  # (B, C, h, w) -> (B, C, h, w)
        x = self.resnets[0](x, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x, context, bias), temb)
        return x


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D / UpBlock2D: (n+1) ResBlocks on [x, skip] concatenations (each followed by a spatial
    transformer if `cross_attention`), then nearest ×2 upsampling and a convolution."""

    def __init__(self, cfg: UNetConfig, level: int, temb_channels: int, cross_attention: bool):
        super().__init__()
        ch = tuple(reversed(cfg.block_out_channels))  # level 0 is the lowest resolution
        out_ch, prev_ch = ch[level], ch[max(level - 1, 0)]
        skip_in_ch = ch[min(level + 1, len(ch) - 1)]  # channels of the down block feeding this level's last skip
        n = tuple(reversed(cfg.per_block("layers_per_block")))[level] + 1
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_ch if i == 0 else out_ch) + (skip_in_ch if i == n - 1 else out_ch), out_ch,
                          temb_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout,
                          time_scale_shift=cfg.resnet_time_scale_shift)
            for i in range(n)
        )
        heads = tuple(reversed(cfg.per_block("attention_head_dim")))[level]
        depth = tuple(reversed(cfg.per_block("transformer_layers_per_block")))[level]
        self.attentions = _transformers(cfg, out_ch, heads, depth, n) if cross_attention else None
        is_last = level == len(ch) - 1
        self.upsamplers = None if is_last else nn.ModuleList([Upsample2D(out_ch)])

    def forward(self, x, skips, temb, context, bias, upsample_size=None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)  # [(B, C, H, W), (B, Cs, H, W)] -> (B, Cout, H, W)
            if self.attentions is not None:
                x = self.attentions[i](x, context, bias)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)  # (B, Cout, 2H, 2W) or the next skip's size
        return x


class UNet2DConditionModel(nn.Module):
    """ε_θ(x_t, t, c): predicts the noise in latent x_t at timestep t given text token states c."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.block_out_channels
        temb_channels = 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_channels, cfg.time_cond_proj_dim)
        self.class_embedding = None
        if cfg.class_embed_type == "projection":
            self.class_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_channels)
        elif cfg.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(ch[0], temb_channels)
        self.down_blocks = nn.ModuleList(
            DownBlock(cfg, i, temb_channels, kind == "CrossAttnDownBlock2D") for i, kind in
            enumerate(cfg.down_block_types)
        )
        self.mid_block = MidBlock(cfg, temb_channels)
        self.up_blocks = nn.ModuleList(
            UpBlock(cfg, i, temb_channels, kind == "CrossAttnUpBlock2D") for i, kind in enumerate(cfg.up_block_types)
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sample x_t (B, C, h, w), timestep (B,) or scalar, text states (B, L, D), mask (B, L) True = keep,
        class_labels the pooled text embedding (B, P) when the config has class_embed_type="projection",
        timestep_cond a distilled student's guidance embedding (B, time_cond_proj_dim) (blocks.guidance_embedding)."""
        cfg, B = self.config, sample.shape[0]
        # 1. Time embedding: sinusoidal features of t, then an MLP (Ho et al. 2020, Appendix B).
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t
        t_freq = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)  # (B, C0)
        cond = None if timestep_cond is None else timestep_cond.to(sample.dtype)  # LCM: w's embedding joins t's
        temb = self.time_embedding(t_freq.to(sample.dtype), cond)  # (B, 4·C0)
        if self.class_embedding is not None:  # a second condition joins t in every ResBlock
            temb = temb + self.class_embedding(self._class_features(class_labels, B, sample))  # (B, 4·C0)
        # 2. Cross-attention mask as an additive score bias on the text tokens: (B, 1, 1, L).
        bias = None
        if encoder_attention_mask is not None:
            bias = ((1.0 - encoder_attention_mask.to(sample.dtype)) * MASK_BIAS)[:, None, None, :]
        # 3. Contracting path, keeping every intermediate feature map for the skip connections.
        h = self.conv_in(sample)  # (B, C0, h, w)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, encoder_hidden_states, bias)
            skips.extend(block_skips)
        # 4. Bottleneck.
        h = self.mid_block(h, temb, encoder_hidden_states, bias)  # (B, C_last, h/2^k, w/2^k)
        # 5. Expanding path: each up block consumes as many skips as it has ResBlocks (last in, first out).
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, block_skips = skips[:-n], skips[-n:]
            size = skips[-1].shape[-2:] if skips else None  # upsample to the next skip's size (odd sizes too)
            h = block(h, block_skips, temb, encoder_hidden_states, bias, size)
        # 6. Output projection to the predicted noise (and, with out_channels = 2·in_channels, the learned variance's
        # interpolation v of Nichol & Dhariwal 2021 eq. 15 in the second half: diffusion/objectives.py).
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, C_out, h, w)

    def _class_features(self, class_labels: torch.Tensor | None, B: int, sample: torch.Tensor) -> torch.Tensor:
        """The class MLP's input: a pooled text vector (B, P) as is ("projection", Imagen §2.2), or a noise level
        (B,) embedded like t ("timestep": a cascade stage's augmentation level, Ho et al. 2021 §4.2)."""
        cfg = self.config
        if class_labels is None:
            what = "a pooled text embedding (B, P)" if cfg.class_embed_type == "projection" else "a noise level (B,)"
            raise ValueError(f"this U-Net is conditioned on {what}: pass class_labels")
        if cfg.class_embed_type == "projection":
            return class_labels.to(sample.dtype)
        level = torch.as_tensor(class_labels, device=sample.device).reshape(-1).expand(B)
        return timestep_embedding(level, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).to(sample.dtype)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, allow_pickle: bool = False) -> UNet2DConditionModel:
        """Load a diffusers-layout folder (`config.json` + safetensors), or a pipeline folder's `unet/`."""
        folder = resolve_model_folder(folder, "unet")
        model = cls(UNetConfig.from_diffusers_config(folder))
        load_into(model, load_weights(folder, allow_pickle=allow_pickle), str(folder))
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `config.json` + `diffusion_pytorch_model.safetensors` (diffusers layout), atomically."""
        save_folder(folder, self.config.to_diffusers_config(), self.state_dict())
