"""Noise-aware classifier p_φ(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, §4 and Appendix K).

The U-Net's contracting half on noisy latents x_t, with the timestep embedding in every ResBlock (AdaGN, §3.1),
attention pooling to one vector (guided-diffusion's `EncoderUNetModel(pool="attention")`, after CLIP's
AttentionPool2d), and one softmax head per attribute:

    x_t (B, c, h, w) ─ conv_in ─► [ResBlock × n, downsample] per level ─► ResBlock ─► GN, SiLU ─► attention pool
    t ─ sinusoidal ─ MLP ─► temb (scale and shift in every ResBlock)             └─► heads: logits (B, K) each

An optional relation head reads two-object scenes: for each class of the `color` head, which relation the object
of that colour stands in to the other one (B, n_colors, n_relations) — "the red object is left of the other".
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from carrara.data import shapes
from carrara.errors import CarraraError
from carrara.models.blocks import Attention, Downsample2D, ResnetBlock2D, TimestepEmbedding, timestep_embedding
from carrara.models.config import CONFIG_NAME
from carrara.models.weights import load_into, load_weights, save_folder

CLASS_NAME = "NoiseAwareClassifier"
RELATION = "relation"  # the optional head's name, conditioned on a class of RELATION_BY
RELATION_BY = "color"
PAIR_SHAPE = "pair_shape"  # the optional head of a pair's shapes: for each colour, the shape of that colour's object
BY_COLOR = (RELATION, PAIR_SHAPE)  # heads whose logits are (B, n_colors, K) and whose classes are (colour, class)
Wanted = dict[str, "int | tuple[int, int] | list[tuple[int, int]]"]  # head → class; BY_COLOR heads: (colour, class)


def _by_color(index: tuple[int, int] | list[tuple[int, int]]) -> list[tuple[int, int]]:
    """A colour-indexed head's wanted (colour, class) pairs: one object's, or a pair's list."""
    return [index] if isinstance(index, tuple) else index


@dataclass
class ClassifierConfig:
    """Shape of the classifier and the names of its classes (saved as the folder's config.json)."""

    in_channels: int = 4
    sample_size: int = 16  # latent side; the attention pool's positional embedding is for this size
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    head_channels: int = 32  # attention pooling: channels per head (guided-diffusion's num_head_channels)
    heads: dict[str, list[str]] = field(default_factory=dict)  # head name → class names, e.g. "shape": [circle, …]
    relations: list[str] = field(default_factory=list)  # the relation head's classes (none: no relation head)
    pair_shapes: bool = False  # a head for the shape of each colour's object in a two-object scene

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        ints = (self.in_channels, self.sample_size, self.layers_per_block, self.norm_num_groups, self.head_channels,
                *self.block_out_channels)
        if not self.block_out_channels or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in ints):
            raise CarraraError(f"{CLASS_NAME} config: channels, sizes and counts must be positive whole numbers")
        if any(c % self.norm_num_groups or c % self.head_channels for c in self.block_out_channels):
            raise CarraraError(f"{CLASS_NAME} config: norm_num_groups={self.norm_num_groups} and head_channels="
                               f"{self.head_channels} must divide every block_out_channels {self.block_out_channels}")
        if self.sample_size % 2 ** (len(self.block_out_channels) - 1):
            raise CarraraError(f"{CLASS_NAME} config: sample_size {self.sample_size} must be divisible by "
                               f"2^{len(self.block_out_channels) - 1} (one halving per level)")
        if not self.heads or any(len(v) < 2 for v in self.heads.values()):
            raise CarraraError(f"{CLASS_NAME} config: give heads, each with at least two class names")
        if self.relations and RELATION_BY not in self.heads:
            raise CarraraError(f"{CLASS_NAME} config: the relation head needs a {RELATION_BY!r} head")
        if self.pair_shapes and not {RELATION_BY, "shape"} <= set(self.heads):
            raise CarraraError(f"{CLASS_NAME} config: the pair-shape head needs {RELATION_BY!r} and 'shape' heads")

    @classmethod
    def from_dict(cls, data: dict) -> ClassifierConfig:
        if data.get("_class_name") != CLASS_NAME:
            raise CarraraError(f"config describes a {data.get('_class_name')}, not a {CLASS_NAME}: check the folder")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if not k.startswith("_") and k not in names)
        if unknown:
            raise CarraraError(f"{CLASS_NAME} config field {unknown[0]!r} is unknown to carrara; remove it")
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict:
        return {"_class_name": CLASS_NAME, **{k: list(v) if isinstance(v, tuple) else v
                                              for k, v in dataclasses.asdict(self).items()}}


class AttentionPool2d(nn.Module):
    """Attention pooling (CLIP; guided-diffusion): the mean token, with a learned position embedding, attends to all
    H·W + 1 tokens; its output is the image's vector."""

    def __init__(self, side: int, channels: int, head_channels: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(side * side + 1, channels) / channels**0.5)
        self.attention = Attention(channels, channels // head_channels, head_channels, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C)
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + self.positional_embedding  # (B, N+1, C)
        return self.attention(tokens[:, :1], tokens)[:, 0]  # the mean token's attention output: (B, C)


class NoiseAwareClassifier(nn.Module):
    """p_φ(y | x_t, t) on the latents the diffusion model denoises, one softmax per attribute."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = cfg = config
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        temb = 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.resnets, self.downsamplers = nn.ModuleList(), nn.ModuleList()
        for level, c in enumerate(ch):
            for i in range(cfg.layers_per_block):
                c_in = ch[max(level - 1, 0)] if i == 0 else c
                self.resnets.append(ResnetBlock2D(c_in, c, temb, groups, 1e-5, time_scale_shift="scale_shift"))
            self.downsamplers.append(Downsample2D(c) if level < len(ch) - 1 else nn.Identity())
        self.mid = ResnetBlock2D(ch[-1], ch[-1], temb, groups, 1e-5, time_scale_shift="scale_shift")
        self.norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-5)
        self.pool = AttentionPool2d(cfg.sample_size // 2 ** (len(ch) - 1), ch[-1], cfg.head_channels)
        self.heads = nn.ModuleDict({name: nn.Linear(ch[-1], len(classes)) for name, classes in cfg.heads.items()})
        if cfg.relations:
            self.heads[RELATION] = nn.Linear(ch[-1], len(cfg.heads[RELATION_BY]) * len(cfg.relations))
        if cfg.pair_shapes:
            self.heads[PAIR_SHAPE] = nn.Linear(ch[-1], len(cfg.heads[RELATION_BY]) * len(cfg.heads["shape"]))

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> dict[str, torch.Tensor]:
        """Logits per head: (B, K) each; the relation head's (B, n_colors, n_relations), the pair-shape head's
        (B, n_colors, n_shapes)."""
        cfg, B = self.config, x.shape[0]
        if tuple(x.shape[1:]) != (cfg.in_channels, cfg.sample_size, cfg.sample_size):
            raise CarraraError(f"the classifier reads latents ({cfg.in_channels}, {cfg.sample_size}, "
                               f"{cfg.sample_size}), got {tuple(x.shape[1:])}: train it on this model's latents")
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t  # (B,)
        temb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0]).to(x.dtype))  # (B, 4·C0)
        h = self.conv_in(x)  # (B, C0, h, w)
        n = cfg.layers_per_block
        for level, down in enumerate(self.downsamplers):
            for resnet in self.resnets[level * n:(level + 1) * n]:
                h = resnet(h, temb)
            h = down(h)  # (B, C, h/2, w/2) below the last level
        h = self.pool(F.silu(self.norm_out(self.mid(h, temb))))  # (B, C_last)
        logits = {name: head(h) for name, head in self.heads.items()}
        if RELATION in logits:
            logits[RELATION] = logits[RELATION].unflatten(1, (len(cfg.heads[RELATION_BY]), len(cfg.relations)))
        if PAIR_SHAPE in logits:
            logits[PAIR_SHAPE] = logits[PAIR_SHAPE].unflatten(1, (len(cfg.heads[RELATION_BY]), len(cfg.heads["shape"])))
        return logits

    def class_names(self) -> dict[str, list[str]]:
        """Every head's class names, the colour-indexed ones included (their classes, not their colours)."""
        cfg = self.config
        return {**cfg.heads, **({RELATION: cfg.relations} if cfg.relations else {}),
                **({PAIR_SHAPE: cfg.heads["shape"]} if cfg.pair_shapes else {})}

    def log_prob(self, x: torch.Tensor, t: torch.Tensor, wanted: Wanted) -> torch.Tensor:
        """log p_φ(y | x_t) = Σ over the wanted heads of log softmax at the wanted class (heads treated as independent,
        as a product of classifiers); the relation head's class is (colour index, relation index), or a list of
        them (both objects of a pair). (B,)"""
        return self.log_prob_each(x, t, [wanted] * x.shape[0])

    def log_prob_each(self, x: torch.Tensor, t: torch.Tensor, wanted: Sequence[Wanted]) -> torch.Tensor:
        """log p_φ(y_i | x_t) of each image for its own classes y_i, in one forward pass (a batch of different
        captions wants different classes). (B,)"""
        if len(wanted) != x.shape[0]:
            raise CarraraError(f"log_prob_each: {len(wanted)} sets of classes for {x.shape[0]} images")
        log_p = {name: v.to(torch.promote_types(v.dtype, torch.float32)).log_softmax(-1)
                 for name, v in self(x, t).items()}
        rows = []
        for i, classes in enumerate(wanted):
            terms = []
            for name, index in classes.items():
                if name in BY_COLOR:
                    terms += [log_p[name][i, c, k] for c, k in _by_color(index)]
                else:
                    terms.append(log_p[name][i, index])
            rows.append(sum(terms, x.new_zeros(())))
        return torch.stack(rows)

    def scene_classes(self, objects: Sequence[dict], relation: str | None) -> Wanted:
        """The classes this classifier has of a `shapes` scene (its metadata's `objects` and `relation`): one object's
        shape, colour, size and position (those it has heads for); two objects' relations, each object's (by its
        colour) to the other one — both, so guidance asks for the pair rather than one side of it — and, with a
        pair-shape head, each object's shape by its colour."""
        cfg = self.config
        if len(objects) == 1:
            return {name: classes.index(objects[0][name]) for name, classes in cfg.heads.items()
                    if objects[0].get(name) in classes}
        colors, (a, b), wanted = cfg.heads.get(RELATION_BY, ()), objects[:2], {}
        if not {a[RELATION_BY], b[RELATION_BY]} <= set(colors):
            return wanted
        if cfg.relations and relation in cfg.relations:
            wanted[RELATION] = [(colors.index(a[RELATION_BY]), cfg.relations.index(relation)),
                                (colors.index(b[RELATION_BY]), cfg.relations.index(shapes.INVERSE[relation]))]
        if cfg.pair_shapes:
            wanted[PAIR_SHAPE] = [(colors.index(o[RELATION_BY]), cfg.heads["shape"].index(o["shape"])) for o in (a, b)]
        return wanted

    def describe(self, wanted: Wanted) -> str:
        """The classes in words, as a PNG records them: "shape=star,color=red"; a colour-indexed head's by colour,
        "relation[red]=left of,relation[blue]=right of,pair_shape[red]=circle"."""
        names, parts = self.class_names(), []
        for head, index in wanted.items():
            if head in BY_COLOR:
                parts += [f"{head}[{names[RELATION_BY][c]}]={names[head][k]}" for c, k in _by_color(index)]
            else:
                parts.append(f"{head}={names[head][index]}")
        return ",".join(parts)

    def prompt_classes(self, prompt: str) -> Wanted:
        """The classes of the scene a `shapes` prompt describes (`shapes.read_caption`, then `scene_classes`): guidance
        toward what was asked for, a pair's both relations and shapes included. Refused in one line when the prompt
        names no object this classifier reads."""
        read = shapes.read_caption(prompt)
        example = ('--classes "shape=star,color=red", or a prompt in shapes\' words ("a red star on the left", '
                   '"a red circle to the left of a blue square")')
        if read is None:
            raise CarraraError(f"--classifier: the prompt {prompt!r} names no object to guide toward; give {example}")
        objects, relation = read
        if relation is not None and objects[0]["color"] == objects[1]["color"]:
            raise CarraraError(f"--classifier: the classifier tells a pair's objects apart by colour; {prompt!r} names "
                               f"{objects[0]['color']} twice")
        wanted = self.scene_classes(objects, relation)
        if not wanted:
            raise CarraraError(f"--classifier: this classifier has no head for what {prompt!r} names; give {example}")
        return wanted

    def parse_classes(self, text: str) -> Wanted:
        """`"shape=star,color=red"` → head → class index, the inverse of `describe`. A colour-indexed head names its
        colour in brackets, as often as wanted: "relation[red]=left of,relation[blue]=right of,pair_shape[red]=circle"
        (a pair: each object's relation to the other and its shape); "relation=left of" alone takes the colour from
        "color=…"."""
        names, wanted, by_color = self.class_names(), {}, {}
        colors = names.get(RELATION_BY, [])
        for item in (s.strip() for s in text.split(",")):
            if not item:
                continue
            key, _, value = (s.strip() for s in item.partition("="))
            head, _, color = key.partition("[")
            head, color = head.strip(), color.rstrip("]").strip()
            if head not in names or (color and head not in BY_COLOR):
                raise CarraraError(f"--classes: unknown attribute {key!r}; this classifier knows "
                                   f"{', '.join(names)} (e.g. --classes \"{next(iter(names))}={names[next(iter(names))][0]}\")")
            if value not in names[head]:
                raise CarraraError(f"--classes {key}={value}: not a {head} this classifier knows; choose one of "
                                   f"{', '.join(names[head])}")
            if color:
                if color not in colors:
                    raise CarraraError(f"--classes {key}: not a colour this classifier knows; choose one of "
                                       f"{', '.join(colors)}")
                by_color.setdefault(head, []).append((colors.index(color), names[head].index(value)))
            else:
                wanted[head] = names[head].index(value)
        if not wanted and not by_color:
            raise CarraraError(f"--classes: name at least one attribute, e.g. \"{', '.join(f'{k}={v[0]}' for k, v in list(names.items())[:2])}\"")
        for head in BY_COLOR:
            if head in wanted:  # the one-object form: of the object of colour color=…
                if RELATION_BY not in wanted:
                    raise CarraraError(f"--classes {head}={names[head][wanted[head]]}: say of which object, with "
                                       f"{RELATION_BY}=… or {head}[colour]=… (the object of that colour)")
                wanted[head] = (wanted[RELATION_BY], wanted[head])
        for head, pairs in by_color.items():
            pairs = ([wanted[head]] if head in wanted else []) + pairs
            wanted[head] = pairs if len(pairs) > 1 else pairs[0]
        return wanted

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> NoiseAwareClassifier:
        """Load a classifier folder, or a `carrara train classifier` run (its classifier/ subfolder)."""
        folder = Path(folder)
        folder = folder / "classifier" if (folder / "classifier" / CONFIG_NAME).is_file() else folder
        if not (folder / CONFIG_NAME).is_file():
            raise CarraraError(f"--classifier {folder}: no trained classifier there (expected classifier/{CONFIG_NAME})")
        try:
            data = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CarraraError(f"cannot read {folder / CONFIG_NAME}: {e}") from None
        if not isinstance(data, dict):
            raise CarraraError(f"{folder / CONFIG_NAME} does not hold a JSON object")
        model = cls(ClassifierConfig.from_dict(data))
        load_into(model, load_weights(folder), str(folder))
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json + safetensors weights, atomically."""
        save_folder(folder, self.config.to_dict(), self.state_dict())
