"""A small CLIP for evaluation: an image CNN and a projection of frozen MiniLM sentence embeddings.

CLIP (Radford et al. 2021) trains an image encoder and a text encoder so that matching
image–text pairs have a high cosine similarity (symmetric InfoNCE, learned temperature). carrara's text
tower is the frozen all-MiniLM-L6-v2 sentence embedding (mean of token states over the mask, as the
model was trained) followed by a trained two-layer projection; the image tower is a ResNet-style CNN.
Weights are saved as safetensors + config.json in a folder (`save_pretrained` / `from_pretrained`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from carrara.errors import CarraraError
from carrara.images import to_model_range
from carrara.models.weights import save_folder
from carrara.text.encoder import TextEncoder, mean_pool


@dataclass
class ClipConfig:
    """The shape of the CLIP model (saved as config.json)."""

    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128, 256)
    text_dim: int = 384  # MiniLM hidden size
    embed_dim: int = 256
    groups: int = 8
    init_temperature: float = 0.07
    # The stem's stride: 0 picks image_size // 64 (at least 1), so a 128-px CLIP runs its blocks at 64² and costs
    # about what the 64-px one does, its 4×4 stride-2 stem still seeing every pixel (a patchify stem).
    stem_stride: int = 0

    def __post_init__(self) -> None:
        if type(self.stem_stride) is not int or self.stem_stride < 0:
            raise CarraraError(f"CLIP stem_stride must be a whole number ≥ 0 (0: image_size // 64), got "
                               f"{self.stem_stride!r}")
        if self.stem_stride == 0:
            self.stem_stride = max(1, self.image_size // 64)

    @classmethod
    def from_dict(cls, d: dict) -> ClipConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known.setdefault("stem_stride", 1)  # a config saved before the patchify stem had a stride-1 stem
        if "channels" in known:
            known["channels"] = tuple(known["channels"])
        return cls(**known)


class _ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, twice, with a (strided) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride) if (stride != 1 or c_in != c_out) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class ImageEncoder(nn.Module):
    """(B, 3, S, S) in [−1, 1] → (B, embed_dim): conv stem (stride `stem_stride`), one strided ResBlock per stage,
    mean pool."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        ch = cfg.channels
        s = cfg.stem_stride
        self.stem = nn.Conv2d(3, ch[0], 3, 1, 1) if s == 1 else nn.Conv2d(3, ch[0], 2 * s, s, (s + 1) // 2)
        self.blocks = nn.Sequential(*[_ResBlock(ch[max(i - 1, 0)], c, 1 if i == 0 else 2, cfg.groups)
                                      for i, c in enumerate(ch)])
        self.norm = nn.GroupNorm(cfg.groups, ch[-1])
        self.proj = nn.Linear(ch[-1], cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))  # (B, C, S / 2^(n−1), S / 2^(n−1))
        return self.proj(F.silu(self.norm(h)).mean(dim=(2, 3)))  # (B, embed_dim)


class ClipModel(nn.Module):
    """encode_image / encode_text give unit vectors; logits = exp(logit_scale) · cos."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.text_proj = nn.Sequential(nn.Linear(config.text_dim, config.embed_dim), nn.GELU(),
                                       nn.Linear(config.embed_dim, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings (B, E) from images (B, 3, S, S) in [−1, 1]."""
        if images.shape[-1] != self.config.image_size or images.shape[-2] != self.config.image_size:
            images = F.interpolate(images, size=(self.config.image_size,) * 2, mode="bicubic", antialias=True)
        return F.normalize(self.image_encoder(images).float(), dim=-1)

    def encode_text(self, sentence_embeddings: torch.Tensor) -> torch.Tensor:
        """Unit text embeddings (B, E) from MiniLM sentence embeddings (B, text_dim) (`mean_pool(…, normalize=False)`)."""
        return F.normalize(self.text_proj(sentence_embeddings).float(), dim=-1)

    def temperature_scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100 as in CLIP."""
        return self.logit_scale.exp().clamp(max=100.0)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `config.json` + `model.safetensors`, atomically."""
        save_folder(folder, asdict(self.config), self.state_dict(), weights_name="model.safetensors")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> ClipModel:
        folder = Path(folder)
        try:
            config = ClipConfig.from_dict(json.loads((folder / "config.json").read_text()))
            state = load_file(folder / "model.safetensors")
        except FileNotFoundError:
            raise CarraraError(f"{folder} is not a CLIP folder (expected config.json and model.safetensors); "
                               f"train one with: carrara train clip --data DIR --out RUN") from None
        except (ValueError, OSError, SafetensorError) as e:
            raise CarraraError(f"cannot read the CLIP weights in {folder}: {str(e).splitlines()[0]}") from None
        model = cls(config)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CarraraError(f"{folder}: weights do not match config.json ({str(e).splitlines()[0]})") from None
        return model.eval()


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor,
              same_text: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021, Fig. 3) over a batch of unit embeddings (B, E).

    `same_text` (B, B) bool marks pairs whose captions are identical: they are positives too (the target
    spreads evenly over them) instead of false negatives, which matters on datasets with repeated captions.
    """
    logits = scale * image_emb @ text_emb.T  # (B, B): image i vs text j
    if same_text is None:
        same_text = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    target = same_text.float() / same_text.float().sum(1, keepdim=True)  # symmetric, rows sum to 1
    loss_i2t = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t2i = -(target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return 0.5 * (loss_i2t + loss_t2i)


# ---------------------------------------------------------------------------------------------------------------
# Using a trained CLIP as a judge: CLIP score (Hessel et al. 2021, eq. 1 with w = 100, torchmetrics' convention) and
# zero-shot retrieval. Retrieval counts captions, not indices, so repeated captions (common in `shapes`) are not
# scored as misses: image→text is a hit at k when the image's own caption is among the k distinct captions closest
# to it; text→image is a hit when one of the k closest images carries that caption.


class ClipScorer:
    """A trained CLIP run plus the frozen text encoder it was trained with."""

    def __init__(self, model: ClipModel, text_encoder, name: str = "carrara-clip"):
        self.model, self.text_encoder, self.name = model.eval(), text_encoder, name

    @classmethod
    def load(cls, run: str | Path) -> ClipScorer:
        run = Path(run)
        folder = run / "clip" if (run / "clip").is_dir() else run
        return cls(ClipModel.from_pretrained(folder), TextEncoder.load("minilm"), name=f"carrara-clip[{run.name}]")

    def fingerprint(self) -> str:
        """SHA-256 of the weights (names, shapes, bytes): what an index or a prior built on this CLIP records."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(f"{name}{tuple(tensor.shape)}".encode() + tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8)
                     .numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.inference_mode()
    def embed_images(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Unit embeddings (N, E) of uint8 images (N, 3, H, W)."""
        out = [self.model.encode_image(to_model_range(images[i:i + batch_size]))
               for i in range(0, len(images), batch_size)]
        return torch.cat(out)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Unit embeddings (N, E) of captions."""
        out = []
        for i in range(0, len(texts), batch_size):
            states, mask = self.text_encoder.encode(texts[i:i + batch_size])
            out.append(self.model.encode_text(mean_pool(states.float(), mask, normalize=False)))
        return torch.cat(out)


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score (N,) = 100 · max(cos, 0) of unit embeddings (N, E) and (N, E)."""
    return 100.0 * (image_emb * text_emb).sum(-1).clamp(min=0.0)


def retrieval(image_emb: torch.Tensor, texts: list[str], embed_texts, ks: tuple[int, ...] = (1, 5),
              hits: dict | None = None) -> dict:
    """Top-k accuracy of image→text and text→image over a set of (image, caption) pairs.

    `embed_texts(list[str]) -> (U, E)` embeds the distinct captions. Returns {"i2t_top1": …, "t2i_top5": …}.
    """
    unique = sorted(set(texts))
    position = {t: i for i, t in enumerate(unique)}
    own = torch.tensor([position[t] for t in texts])  # (N,) caption index of each image
    sim = image_emb @ embed_texts(unique).T  # (N, U)
    out = {}
    for k in ks:
        k_t = min(k, len(unique))
        top_texts = sim.topk(k_t, dim=1).indices  # (N, k): closest distinct captions to each image
        out[f"i2t_top{k}"] = float((top_texts == own[:, None]).any(1).float().mean())
        k_i = min(k, len(texts))
        top_images = sim.T.topk(k_i, dim=1).indices  # (U, k): closest images to each caption
        t2i = (own[top_images] == torch.arange(len(unique))[:, None]).any(1).float()  # (U,) per distinct caption
        out[f"t2i_top{k}"] = float(t2i.mean())
        if hits is not None:  # per-item hits, for bootstrap intervals
            hits[f"t2i_top{k}"] = t2i.numpy()
    return out
