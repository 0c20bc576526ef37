"""CLIP score and zero-shot retrieval with carrara's own CLIP (models/clip.py).

CLIP score = 100 · max(cos(E_img, E_text), 0), Hessel et al. 2021 ("CLIPScore", eq. 1 with w = 100, the
convention torchmetrics uses). Retrieval counts captions, not indices, so repeated captions (common in
`shapes`) are not scored as misses: image→text is a hit at k when the image's own caption is among the k
distinct captions closest to it; text→image is a hit when one of the k closest images carries that caption.
"""
from __future__ import annotations

from pathlib import Path

import torch

from carrara.models.clip import ClipModel, sentence_embeddings


class ClipScorer:
    """A trained CLIP run plus the frozen text encoder it was trained with."""

    def __init__(self, model: ClipModel, text_encoder, name: str = "carrara-clip"):
        self.model, self.text_encoder, self.name = model.eval(), text_encoder, name

    @classmethod
    def load(cls, run: str | Path) -> ClipScorer:
        from carrara.text.encoder import TextEncoder

        run = Path(run)
        folder = run / "clip" if (run / "clip").is_dir() else run
        return cls(ClipModel.from_pretrained(folder), TextEncoder.load("minilm"), name=f"carrara-clip[{run.name}]")

    @torch.inference_mode()
    def embed_images(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Unit embeddings (N, E) of uint8 images (N, 3, H, W)."""
        out = [self.model.encode_image(images[i:i + batch_size].float() / 127.5 - 1.0)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Unit embeddings (N, E) of captions."""
        out = []
        for i in range(0, len(texts), batch_size):
            states, mask = self.text_encoder.encode(texts[i:i + batch_size])
            out.append(self.model.encode_text(sentence_embeddings(states.float(), mask)))
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
