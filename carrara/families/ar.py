"""A decoder-only transformer over VQ-VAE codes with the caption as prefix: DALL-E 1 (Ramesh et al. 2021).

DALL-E 1 models text tokens and 32×32 image codes as one stream with a GPT (Radford et al. 2019); here the
caption enters as `n_prefix` tokens projected from its pooled MiniLM embedding, and the image is the
VQ-VAE's code grid in raster order (vqvae.py, the tokenizer, trained first and frozen). Layer names follow
nanoGPT (`wte`, `wpe`, `c_attn`). igpt.py reuses `GPT` and `sample_tokens` over colour-quantised pixels.

Training maximises log p(c_1..c_N | text) = Σ_i log p(c_i | c_<i, text) (teacher forcing). Sampling draws
one code at a time with temperature and top-k, from a key/value cache, and optionally mixes conditional
and unconditional logits (classifier-free guidance on logits, as Parti, Yu et al. 2022 §2.2, does).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from carrara.families import vqvae
from carrara.families.base import Batch, image_generators
from carrara.images import to_model_range

TRAIN = {"steps": 2000, "batch_size": 32, "lr": 5e-4, "warmup_steps": 50, "sample_every": 500}  # TrainConfig fields (train.py)
COND_DROPOUT = 0.1


@dataclass
class GPTConfig:
    """The transformer's shape."""

    vocab_size: int = 128
    seq_len: int = 64  # image tokens (the prefix comes on top)
    n_prefix: int = 4  # caption tokens projected from the pooled embedding
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    cond_dim: int = 384


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP (GPT-2), with an optional key/value cache for sampling."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head = c.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(c.n_embd), nn.LayerNorm(c.n_embd)
        self.c_attn, self.c_proj = nn.Linear(c.n_embd, 3 * c.n_embd), nn.Linear(c.n_embd, c.n_embd)
        self.mlp = nn.Sequential(nn.Linear(c.n_embd, 4 * c.n_embd), nn.GELU(), nn.Linear(4 * c.n_embd, c.n_embd))

    def attend(self, x: torch.Tensor, cache: list | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))  # (B, nh, T, hs) each
        if cache is not None and cache:  # new positions attend to every cached one and causally among themselves
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        if cache is not None:
            cache[:] = [k, v]
        past = k.shape[2] - T
        if past == 0:  # training, or the prefix of a sample: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        else:  # row r is position past + r: it sees keys 0 … past + r
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(past)  # (T, past + T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        x = x + self.attend(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Caption prefix + tokens → next-token logits."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.prefix = nn.Linear(c.cond_dim, c.n_prefix * c.n_embd)
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.n_prefix + c.seq_len, c.n_embd)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)

    def forward(self, cond: torch.Tensor | None, tokens: torch.Tensor, *, start: int = 0,
                caches: list | None = None) -> torch.Tensor:
        """Logits (B, T', V) at positions start … of [prefix(cond), tokens]; cond None continues a cache."""
        c = self.config
        x = self.wte(tokens)  # (B, T, n_embd)
        if cond is not None:
            x = torch.cat([self.prefix(cond).view(len(cond), c.n_prefix, c.n_embd), x], 1)  # (B, P + T, n_embd)
        x = x + self.wpe(torch.arange(start, start + x.shape[1], device=x.device))
        for i, block in enumerate(self.h):
            x = block(x, None if caches is None else caches[i])
        return self.lm_head(self.ln_f(x))

    def next_token_loss(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """−(1/N) Σ_i log p(t_i | t_<i, caption) in nats per token (teacher forcing); tokens (B, N)."""
        P = self.config.n_prefix
        logits = self(cond, tokens[:, :-1])[:, P - 1:]  # (B, N, V): position P−1+i predicts t_i
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def pick(logits: torch.Tensor, gens: list[torch.Generator], temperature: float, top_k: int) -> torch.Tensor:
    """One token per row of logits (B, V): argmax at temperature 0, else softmax(logits / T) over the top k,
    drawn by inverse CDF with row i's own uniform number (so image i depends on its seed alone)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    u = torch.stack([torch.rand((), generator=g) for g in gens]) * cdf[:, -1]  # (B,)
    return torch.searchsorted(cdf, u[:, None]).clamp(max=logits.shape[-1] - 1).squeeze(1)


@torch.no_grad()
def sample_tokens(gpt: GPT, cond: torch.Tensor, seed: int, *, temperature: float = 1.0, top_k: int = 0,
                  guidance: float = 1.0, uncond: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) tokens, one at a time from a key/value cache; with `uncond` (B, D) and guidance w ≠ 1 the logits
    are l_u + w (l_c − l_u) (classifier-free guidance, Ho & Salimans 2022, on logits)."""
    B, N, P = len(cond), gpt.config.seq_len, gpt.config.n_prefix
    guided = uncond is not None and guidance != 1.0
    gens = image_generators(seed, B)
    caches = [[] for _ in gpt.h]
    logits = gpt(torch.cat([cond, uncond]) if guided else cond,
                 torch.zeros(2 * B if guided else B, 0, dtype=torch.long, device=cond.device), caches=caches)
    tokens = []
    for i in range(N):
        last = logits[:, -1].float()  # (B or 2B, V)
        if guided:
            c, u = last.chunk(2)
            last = u + guidance * (c - u)
        t = pick(last, gens, temperature, top_k)  # (B,)
        tokens.append(t)
        if i + 1 < N:
            logits = gpt(None, torch.cat([t, t])[:, None] if guided else t[:, None], start=P + i, caches=caches)
    return torch.stack(tokens, 1)


@dataclass
class Config:
    """The prior's transformer; the tokenizer's shape comes from the VQ-VAE run it models."""

    gpt: GPTConfig = field(default_factory=GPTConfig)
    vqvae: vqvae.Config = field(default_factory=vqvae.Config)
    temperature: float = 1.0
    top_k: int = 0  # 0: the whole vocabulary


class ARPrior(nn.Module):
    """The frozen VQ-VAE (tokenizer and decoder) and the transformer over its codes."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.vqvae = vqvae.build(config.vqvae).requires_grad_(False).eval()
        self.gpt = GPT(config.gpt)

    def train(self, mode: bool = True) -> ARPrior:
        super().train(mode)
        self.vqvae.eval()  # frozen: its EMA codebook must not move
        return self


def build(config: Config) -> ARPrior:
    """The prior for `config.vqvae`'s codes: vocabulary K, sequence h·w (set here, whatever config.gpt says)."""
    grid = config.vqvae.image_size // config.vqvae.factor
    gpt = dataclasses.replace(config.gpt, vocab_size=config.vqvae.codebook_size, seq_len=grid * grid)
    return ARPrior(dataclasses.replace(config, gpt=gpt))


def initialize(model: ARPrior, images: torch.Tensor, cond: torch.Tensor) -> None:
    """Nothing: the tokenizer comes trained (train.py loads it before this)."""


def prepare(model: ARPrior, images: torch.Tensor) -> torch.Tensor:
    """Every image's codes (N, h·w), raster order, by the frozen tokenizer — once, not every step."""
    return torch.cat([model.vqvae.encode_codes(to_model_range(images[i:i + 256])) for i in range(0, len(images), 256)])


def loss(model: ARPrior, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy of the model's transformer (`model.gpt`) on the token grid, caption as prefix."""
    return model.gpt.next_token_loss(batch.cond, batch.x)


@torch.no_grad()
def model_tokens(model, cond: torch.Tensor, seed: int, *, temperature: float | None = None, top_k: int | None = None,
                 guidance: float = 1.0, uncond: torch.Tensor | None = None) -> torch.Tensor:
    """`sample_tokens` from `model.gpt`, temperature and top-k defaulting to the model's config."""
    c = model.config
    return sample_tokens(model.gpt, cond, seed, temperature=c.temperature if temperature is None else temperature,
                         top_k=c.top_k if top_k is None else top_k, guidance=guidance, uncond=uncond)


def sample(model: ARPrior, cond: torch.Tensor, seed: int, **options) -> torch.Tensor:
    """Codes from the transformer, decoded by the VQ-VAE: (B, 3, S, S) in [−1, 1]."""
    return model.vqvae.decode_codes(model_tokens(model, cond, seed, **options))


@torch.no_grad()
def report(model: ARPrior, data: torch.Tensor, cond: torch.Tensor) -> dict:
    """NLL of the codes in nats per code (the image's NLL under the VQ-VAE + prior, up to the decoder's)."""
    return {"nll_nats_per_code": round(float(model.gpt.next_token_loss(cond, data)), 5)}
