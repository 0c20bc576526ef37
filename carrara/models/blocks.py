"""Layers shared by the autoencoder and the U-Net, named as in diffusers so state dicts load one to one.

Notation: B batch, C channels, H×W spatial size, N = H·W image tokens, L text tokens, nh heads, hd head size.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in `module` (only those with requires_grad if `trainable_only`)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------------------------
# Timestep embedding


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: int = 10000
) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps, Vaswani et al. (2017) §3.5 as used by Ho et al. (2020).

    Frequencies ω_i = max_period^(-i / (dim/2 - freq_shift)), i = 0..dim/2-1; output [sin(tω), cos(tω)]
    (or [cos, sin] if `flip_sin_to_cos`), exactly diffusers' `get_timestep_embedding`. Always float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (dim/2,)
    args = timesteps[:, None].float() * freqs[None, :]  # (B, dim/2)
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (B, 2·(dim/2))
    return F.pad(emb, (0, dim % 2))  # (B, dim)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of a guidance scale w (B,): [sin, cos] of (w − 1)·1000 at frequencies 10000^(−i/(dim/2 − 1)),
    Latent Consistency Models (Luo et al. 2023) §4.2 after VDM; exactly diffusers' `get_guidance_scale_embedding` of
    w − 1 (LCM's w is the classifier-free scale minus one). Always float32, (B, dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(torch.log(torch.tensor(10000.0))
                                                                                    / (half - 1)))  # (dim/2,)
    args = ((w.float() - 1.0) * 1000.0)[:, None] * freqs[None, :]  # (B, dim/2)
    return F.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=1), (0, dim % 2))  # (B, dim)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the sinusoidal embedding, Ho et al. (2020) Appendix B (diffusers `TimestepEmbedding`).

    With `cond_proj_dim` a second embedding (B, cond_proj_dim) is projected (no bias) and added to the input first:
    LCM's guidance-scale embedding (diffusers' `time_cond_proj_dim`)."""

    def __init__(self, in_channels: int, time_embed_dim: int, cond_proj_dim: int | None = None):
        super().__init__()
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim else None
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, t_emb: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None and self.cond_proj is not None:
            t_emb = t_emb + self.cond_proj(condition)  # (B, in)
        return self.linear_2(self.act(self.linear_1(t_emb)))  # (B, time_embed_dim)


# ---------------------------------------------------------------------------------------------------------------
# Convolutional pieces


class ResnetBlock2D(nn.Module):
    """Pre-activation residual block with the time embedding, Ho et al. (2020) Appendix B / He et al. (2016).

    time_scale_shift "default": h + proj(temb) before the second GroupNorm (DDPM); "scale_shift": adaptive group
    normalization, AdaGN(h, y) = y_s · GroupNorm(h) + y_b with [y_s − 1, y_b] = proj(temb) (Dhariwal & Nichol 2021
    §3.1; diffusers `time_embedding_norm="scale_shift"`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int,
        eps: float,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        time_scale_shift: str = "default",
    ):
        super().__init__()
        self.output_scale_factor, self.scale_shift = output_scale_factor, time_scale_shift == "scale_shift"
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        proj_channels = 2 * out_channels if self.scale_shift else out_channels  # [scale, shift] or the additive term
        self.time_emb_proj = nn.Linear(temb_channels, proj_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        emb = None
        if self.time_emb_proj is not None and temb is not None:
            emb = self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, Cout or 2·Cout, 1, 1)
        if self.scale_shift and emb is not None:
            scale, shift = emb.chunk(2, dim=1)  # (B, Cout, 1, 1) each
            h = self.norm2(h) * (1 + scale) + shift  # AdaGN
        else:
            h = self.norm2(h if emb is None else h + emb)
        h = self.conv2(self.dropout(F.silu(h)))  # (B, Cout, H, W)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)  # (B, Cout, H, W)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3×3 convolution; padding 0 pads right/bottom by one first, as the LDM encoder does."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour ×2 (or to `size`) followed by a 3×3 convolution (diffusers `Upsample2D(use_conv=True)`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")  # (B, C, *size)
        return self.conv(x)


# ---------------------------------------------------------------------------------------------------------------
# Attention pieces


class Attention(nn.Module):
    """Multi-head scaled dot-product attention, Vaswani et al. (2017) Eq. 1; diffusers `Attention` names.

    `bias` is an additive score bias broadcastable to (B, nh, N, L), e.g. (B, 1, 1, L) with −10000 at masked keys.
    `upcast` computes softmax(QKᵀ/√d)V in float32 even under autocast.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = False,
        upcast: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim), nn.Dropout(0.0)])
        self.kv_cache: list | None = None  # [context, K, V] while `text_kv_cache` is on, else None

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:  # x (B, N, D), context (B, L, Dc) -> (B, N, D)
        if context is None:
            context = x
            k, v = self.to_k(context), self.to_v(context)  # (B, N, nh·hd)
        else:
            k, v = self._text_kv(context)  # (B, L, nh·hd)
        q = self.to_q(x)  # (B, N, nh·hd)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, nh, N|L, hd)
        dtype = q.dtype
        with torch.autocast(q.device.type, enabled=False) if self.upcast else contextlib.nullcontext():
            if self.upcast:
                q, k, v = q.float(), k.float(), v.float()
            mask = None if bias is None else bias.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # softmax(QKᵀ/√hd)V: (B, nh, N, hd)
        out = out.transpose(1, 2).flatten(2).to(dtype)  # (B, N, nh·hd)
        return self.to_out[1](self.to_out[0](out))

    def _text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """to_k(context), to_v(context): computed once per context tensor while the cache is on (the text states are
        the same tensor at every sampling step; the cache holds it, so its identity cannot pass to another one)."""
        cache = self.kv_cache
        if cache and cache[0] is context:
            return cache[1], cache[2]
        k, v = self.to_k(context), self.to_v(context)
        if cache is not None:
            cache[:] = [context, k, v]
        return k, v


@contextlib.contextmanager
def text_kv_cache(*networks: nn.Module):
    """Within this block every cross-attention computes the keys and values of a given text context once (exact: the
    same products, reused), as sampling calls the network on the same text states at each step. Not for training,
    and the context must not be changed in place inside the block (the pipeline never does)."""
    layers = [m for net in networks if net is not None for m in net.modules()
              if isinstance(m, Attention) and not isinstance(m, SpatialSelfAttention)]
    for m in layers:
        m.kv_cache = []
    try:
        yield
    finally:
        for m in layers:
            m.kv_cache = None


class SpatialSelfAttention(Attention):
    """Single-head self-attention over the H×W grid with GroupNorm and residual (LDM autoencoder mid-block)."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        h = super().forward(h).transpose(1, 2).reshape(x.shape)  # (B, C, H, W)
        return x + h


class GEGLU(nn.Module):
    """Gated GELU unit, Shazeer (2020) "GLU Variants Improve Transformer": x·W ⊙ GELU(x·V)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, dim_in) -> (B, N, dim_out)
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """Position-wise feed-forward with GEGLU and 4× width (diffusers `FeedForward(activation_fn="geglu")`)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention to text, GEGLU MLP (Rombach et al. 2022)."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, dim_head, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim=cross_attention_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, N, D) self-attention
        x = x + self.attn2(self.norm2(x), context, bias)  # (B, N, D) cross-attention to (B, L, Dc)
        return x + self.ff(self.norm3(x))  # (B, N, D)


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm → proj_in → transformer blocks on N tokens → proj_out, plus residual.

    Rombach et al. (2022) §3.3 "cross-attention mechanism"; 1×1 convolutions or (use_linear_projection) linears.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        cross_attention_dim: int,
        groups: int,
        use_linear_projection: bool = False,
        num_layers: int = 1,
        upcast: bool = False,
    ):
        super().__init__()
        dim_head = channels // heads
        inner_dim = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = nn.Linear if use_linear_projection else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, cross_attention_dim, upcast) for _ in range(num_layers)
        )
        self.proj_out = proj(inner_dim, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        B, _, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)  # (B, D, H, W)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, -1)  # (B, N, C|D)
        if self.use_linear_projection:
            h = self.proj_in(h)  # (B, N, D)
        for block in self.transformer_blocks:
            h = block(h, context, bias)  # (B, N, D)
        if self.use_linear_projection:
            h = self.proj_out(h)  # (B, N, C)
        h = h.reshape(B, H, W, -1).permute(0, 3, 1, 2)  # (B, D|C, H, W)
        if not self.use_linear_projection:
            h = self.proj_out(h)  # (B, C, H, W)
        return x + h  # x first: the sum keeps x's memory format (h is channels-last strided after the permute)
