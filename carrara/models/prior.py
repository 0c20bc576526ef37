"""The unCLIP diffusion prior's network: CLIP text → CLIP image embedding (Ramesh et al. 2022, §2.2).

"A decoder-only Transformer with a causal attention mask on a sequence consisting of, in order: the encoded text,
the CLIP text embedding, an embedding for the diffusion timestep, the noised CLIP image embedding, and a final
embedding whose output from the Transformer is used to predict the unnoised CLIP image embedding." The output at
that final (learned query) position is x̂0 itself: the prior is trained on MSE to the clean z_i, not on ε.
Names and the null-condition scheme follow lucidrains/DALLE2-pytorch (`DiffusionPriorNetwork`, `CausalTransformer`):

    sequence (B, S = L + 4, W):  [ text states (L) | z_t | timestep | x_t = noised z_i | learned query ]
                                   └──────── attends only to itself and earlier positions (causal) ────────┘
    output: proj_out(norm(h[:, −1]))  (B, E) = x̂0, in the scaled space x = √E · z_i

The condition is a tuple (states (B, L, text_dim), mask (B, L) bool, text_embed (B, E), keep (B,)): `keep` = 0
replaces the text (states and embedding) by learned null tokens, which is how classifier-free guidance drops the
text (10 % of training steps in DALL-E 2) and how the sampler builds the unconditional pass (diffusion/guidance.py).
Padded text positions are masked out as keys, so trimming the padding does not change the output.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from carrara.errors import CarraraError
from carrara.models.blocks import TimestepEmbedding, timestep_embedding
from carrara.models.weights import load_into, save_folder

Condition = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # states, mask, text_embed, keep
N_SPECIAL = 4  # text embedding, timestep, noised image embedding, learned query


@dataclass
class PriorConfig:
    """The prior network's shape (saved as config.json beside its weights)."""

    embed_dim: int = 256  # E: the CLIP embedding size
    text_dim: int = 384  # width of the text token states (the CLIP's frozen MiniLM)
    max_text_len: int = 64
    width: int = 256
    layers: int = 6
    heads: int = 8
    mlp_ratio: int = 4

    @classmethod
    def from_dict(cls, d: dict) -> PriorConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention under a boolean mask (True = may attend), scaled dot product."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise CarraraError(f"prior width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        q, k, v = self.c_attn(x).split(w, dim=2)
        q, k, v = (a.view(b, s, self.heads, w // self.heads).transpose(1, 2) for a in (q, k, v))  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])  # (B, nh, S, hs)
        return self.c_proj(y.transpose(1, 2).reshape(b, s, w))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2): x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(width), CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), allowed)
        return x + self.mlp(self.ln_2(x))


class DiffusionPriorNetwork(nn.Module):
    """f_θ(x_t, t, y) → x̂0 (B, E): the causal transformer of DALL-E 2 §2.2 (see the module docstring)."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = c = config
        self.text_in = nn.Sequential(nn.LayerNorm(c.text_dim), nn.Linear(c.text_dim, c.width))  # "encoded text"
        self.text_embed_in = nn.Linear(c.embed_dim, c.width)  # the CLIP text embedding z_t
        self.time_in = TimestepEmbedding(c.width, c.width)  # sinusoidal → MLP
        self.image_in = nn.Linear(c.embed_dim, c.width)  # the noised image embedding x_t
        self.learned_query = nn.Parameter(torch.randn(c.width) * 0.02)
        self.null_text_state = nn.Parameter(torch.randn(c.width) * 0.02)  # the dropped text: one token …
        self.null_text_embed = nn.Parameter(torch.randn(c.width) * 0.02)  # … and a null z_t
        self.pos_text = nn.Parameter(torch.randn(c.max_text_len, c.width) * 0.02)
        self.pos_special = nn.Parameter(torch.randn(N_SPECIAL, c.width) * 0.02)
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.layers))
        self.norm_out = nn.LayerNorm(c.width)
        self.proj_out = nn.Linear(c.width, c.embed_dim)

    def tokens(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> tuple[torch.Tensor, torch.Tensor]:
        """The input sequence (B, S, W) and the attention mask (B, S, S): causal, padded text keys left out."""
        states, mask, text_embed, keep = cond
        b, length = x_t.shape[0], states.shape[1]
        if length > self.config.max_text_len:
            raise CarraraError(f"{length} text tokens; this prior takes at most {self.config.max_text_len}")
        kept = (keep > 0.5).view(b, 1, 1)  # (B, 1, 1)
        text = self.text_in(states.to(x_t.dtype))  # (B, L, W)
        null_text = F.pad(self.null_text_state.expand(b, 1, -1), (0, 0, 0, length - 1))  # (B, L, W): token 0 only
        text = torch.where(kept, text, null_text) + self.pos_text[:length]
        valid = torch.where(kept.view(b, 1), mask.bool(), torch.arange(length, device=x_t.device) == 0)  # (B, L)
        z_t = torch.where(kept.view(b, 1), self.text_embed_in(text_embed.to(x_t.dtype)), self.null_text_embed)
        t_emb = self.time_in(timestep_embedding(t.reshape(-1).expand(b), self.config.width))  # (B, W)
        special = torch.stack([z_t, t_emb.to(x_t.dtype), self.image_in(x_t), self.learned_query.expand(b, -1)], 1)
        h = torch.cat([text, special + self.pos_special], dim=1)  # (B, S, W)
        s = h.shape[1]
        keys = torch.cat([valid, valid.new_ones(b, N_SPECIAL)], dim=1)  # (B, S)
        causal = torch.ones(s, s, dtype=torch.bool, device=h.device).tril()  # (S, S): j ≤ i
        return h, causal[None] & keys[:, None, :]  # (B, S, W), (B, S, S)

    def hidden_states(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """The transformer's output at every position (B, S, W) — the causal mask's test looks at all of them."""
        h, allowed = self.tokens(x_t, t, cond)
        for block in self.blocks:
            h = block(h, allowed)
        return h

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """x̂0 (B, E) from the final query position."""
        return self.proj_out(self.norm_out(self.hidden_states(x_t, t, cond)[:, -1]))

    def save_pretrained(self, folder: str | os.PathLike, extra: dict | None = None) -> None:
        """Write `config.json` (the shape and `extra`, e.g. the schedule and the CLIP's fingerprint) + weights."""
        save_folder(folder, {**asdict(self.config), **(extra or {})}, self.state_dict(),
                    weights_name="model.safetensors")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> tuple[DiffusionPriorNetwork, dict]:
        """(the network in eval mode, its whole config.json)."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "config.json").read_text())
            state = load_file(folder / "model.safetensors")
        except FileNotFoundError:
            raise CarraraError(f"{folder} is not a prior folder (expected config.json and model.safetensors); "
                               "train one with: carrara train prior --clip CLIP_RUN --data DIR --out RUN") from None
        except (ValueError, OSError, SafetensorError) as e:
            raise CarraraError(f"cannot read the prior in {folder}: {str(e).splitlines()[0]}") from None
        model = cls(PriorConfig.from_dict(meta))
        load_into(model, state, str(folder))
        return model.eval(), meta
