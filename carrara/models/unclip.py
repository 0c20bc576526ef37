"""The unCLIP decoder's conditioning on a CLIP image embedding z_i (Ramesh et al. 2022, §2.1, after GLIDE).

"We modify the architecture described in Nichol et al. (2021) by projecting and adding CLIP embeddings to the
existing timestep embedding, and by projecting CLIP embeddings into four extra tokens of context that are
concatenated to the sequence of outputs from the GLIDE text encoder." carrara's latent U-Net already has both slots:

    z_i (B, E) ─ ·√E ─┬─ U-Net class_embedding (class_embed_type="projection": MLP, added to the time embedding)
                      └─ ImageTokens: Linear(E, K·D) ─ view (B, K, D) ─ LayerNorm ─┐
    text token states (B, L, D) ───────────────────────────────────────────────── cat ─► context (B, K + L, D)
                                                                                          └─► cross-attention

The U-Net folder stays diffusers-style; `ImageTokens` (K = 4 as in DALL-E 2) is saved beside it as image_tokens/
(config.json + model.safetensors). A dropped z_i is the zero vector ("randomly setting the CLIP embeddings to zero
10% of the time"), a dropped text the empty prompt's states: the unconditional pass of classifier-free guidance.
z_i is scaled by √E, as the prior scales it (a unit vector's entries are ~1/√E, a weak input for a fresh layer).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from carrara.errors import CarraraError
from carrara.models.unet import UNet2DConditionModel as UNet
from carrara.models.weights import load_into, save_folder

IMAGE_TOKENS = "image_tokens"  # the folder beside unet/ in a decoder folder
MAX_WIDTH = 1 << 16  # a sanity bound on E, D and K: a damaged config must not ask for terabytes


@dataclass
class ImageTokensConfig:
    """The projection's shape (saved as image_tokens/config.json)."""

    embed_dim: int = 256  # E: the CLIP embedding size
    cross_attention_dim: int = 384  # D: the width of the text token states the U-Net attends to
    num_tokens: int = 4  # K: DALL-E 2's four extra context tokens

    def __post_init__(self):
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= MAX_WIDTH:
                raise CarraraError(f"image tokens config {name}={value!r} must be a whole number from 1 to {MAX_WIDTH}")

    @classmethod
    def from_dict(cls, d: dict) -> ImageTokensConfig:
        if not isinstance(d, dict):
            raise CarraraError(f"image tokens config must be a JSON object, got {type(d).__name__}")
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class ImageTokens(nn.Module):
    """z_i → K context tokens, and the U-Net's inputs: (context (B, K + L, D), class_labels (B, E))."""

    def __init__(self, config: ImageTokensConfig):
        super().__init__()
        self.config = c = config
        self.proj = nn.Linear(c.embed_dim, c.num_tokens * c.cross_attention_dim)
        self.norm = nn.LayerNorm(c.cross_attention_dim)

    def forward(self, states: torch.Tensor, image_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text states (B, L, D) and unit (or zero, when dropped) image embeddings (B, E) → the U-Net's two inputs."""
        c, b = self.config, image_embed.shape[0]
        scaled = image_embed.float() * c.embed_dim ** 0.5  # (B, E)
        tokens = self.norm(self.proj(scaled).view(b, c.num_tokens, c.cross_attention_dim))  # (B, K, D)
        context = torch.cat([tokens.to(states.dtype), states], dim=1)  # (B, K + L, D)
        return context, scaled.to(states.dtype)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `config.json` + `model.safetensors`, atomically."""
        save_folder(folder, asdict(self.config), self.state_dict(), weights_name="model.safetensors")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> ImageTokens:
        folder = Path(folder)
        try:
            config = ImageTokensConfig.from_dict(json.loads((folder / "config.json").read_text()))
            state = load_file(folder / "model.safetensors")
        except FileNotFoundError:
            raise CarraraError(f"{folder} is not an unCLIP image-token folder (expected config.json and "
                               "model.safetensors); train a decoder with: carrara train decoder") from None
        except (ValueError, TypeError, OSError, SafetensorError) as e:
            raise CarraraError(f"cannot read the image tokens in {folder}: {str(e).splitlines()[0]}") from None
        except CarraraError as e:
            raise CarraraError(f"{folder / 'config.json'}: {e}") from None
        model = cls(config)
        load_into(model, state, str(folder))
        return model.eval()


class UnclipDecoder(nn.Module):
    """ε_θ(x_t, t, text, z_i): the U-Net and its image tokens as one module, the unit the trainer optimises."""

    def __init__(self, unet: UNet, image_tokens: ImageTokens):
        super().__init__()
        check_decoder(unet, image_tokens)
        self.unet, self.image_tokens = unet, image_tokens

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor,
                image_embed: torch.Tensor) -> torch.Tensor:
        context, class_labels = self.image_tokens(states, image_embed)  # (B, K + L, D), (B, E)
        return self.unet(x_t, t, context, class_labels=class_labels)


def check_decoder(unet: UNet, image_tokens: ImageTokens) -> None:
    """One clear line if the U-Net cannot take this projection's z_i and tokens."""
    u, c = unet.config, image_tokens.config
    if u.class_embed_type != "projection" or u.projection_class_embeddings_input_dim != c.embed_dim:
        raise CarraraError(f"this U-Net is not an unCLIP decoder for {c.embed_dim}-d image embeddings (needs "
                           f"class_embed_type='projection' with input dim {c.embed_dim})")
    if u.cross_attention_dim != c.cross_attention_dim:
        raise CarraraError(f"the image tokens are {c.cross_attention_dim}-d but the U-Net attends to "
                           f"{u.cross_attention_dim}-d context")
