"""Typed configs for the two networks, read from and written to diffusers' `config.json`, and the folder layout.

A diffusers model folder holds `config.json` and `diffusion_pytorch_model.safetensors`; a pipeline folder holds
one such folder per part (`unet/`, `vae/`). Every `config.json` key maps to one dataclass field of the same name;
diffusers keys carrara does not implement are accepted only at their default value (`_FIXED_*` below), so a
config that would build a different network is refused with a CarraraError naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carrara.errors import CarraraError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose layout these configs follow (written into config.json)

_ANY = object()  # marks a diffusers field whose value does not change the network

# diffusers fields not implemented by carrara: name -> accepted values (the first is diffusers' default).
_FIXED_UNET: dict[str, tuple] = {
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "addition_embed_type_num_heads": (64, _ANY),
}
TIME_SCALE_SHIFT = ("default", "scale_shift")  # the `resnet_time_scale_shift` values carrara implements
_FIXED_VAE: dict[str, tuple] = {"latents_mean": (None,), "latents_std": (None,)}
_ACTIVATIONS = ("silu", "swish")  # the same function under two names

# Sizes refused before anything is allocated (a hostile or mistyped config.json must not ask for 160 GB). Generous
# for real models: Stable Diffusion 1.x/2.x/XL have 4 levels of at most 1280 channels, latents of side 64/96/128,
# images of side 512–1024, and at most 2.6 billion U-Net parameters (SDXL); SD 1.5's U-Net has 0.86 billion.
MAX_LEVELS = 8
MAX_CHANNELS = 8192
MAX_LATENT_SIDE = 512  # UNet sample_size: the latent side the pipeline samples at
MAX_IMAGE_SIDE = 8192  # AutoencoderKL sample_size: the image side
MAX_PARAMETERS = 5_000_000_000  # 20 GB of float32 weights


def _same(value: Any, allowed: Any) -> bool:
    """Equal, without Python's False == 0 and None-vs-value confusions."""
    return value == allowed and isinstance(value, bool) == isinstance(allowed, bool) and (value is None) == (
        allowed is None)


def _freeze(value: Any) -> Any:
    """JSON lists -> tuples (recursively), so configs compare and hash like the dataclass defaults."""
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _thaw(value: Any) -> Any:
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def _read_config_dict(src: dict | str | os.PathLike) -> dict:
    """A config dict as given, or read from a `config.json` path or a folder holding one."""
    if isinstance(src, dict):
        return dict(src)
    path = Path(src)
    path = path / CONFIG_NAME if path.is_dir() else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CarraraError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CarraraError(f"cannot read config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise CarraraError(f"config file {path} does not hold a JSON object")
    return data


def _config_from_dict(cls, src, fixed: dict[str, tuple], class_name: str):
    """Build dataclass `cls` from a diffusers config, refusing fields or values carrara does not implement."""
    data = _read_config_dict(src)
    if data.get("_class_name", class_name) != class_name:
        raise CarraraError(f"config describes a {data['_class_name']}, not a {class_name}: check the folder")
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key.startswith("_") or key in names:
            continue
        if key not in fixed:
            raise CarraraError(f"{class_name} config field {key!r} is unknown to carrara; remove it")
        allowed = fixed[key]
        values = value if isinstance(value, list) else [value]  # e.g. only_cross_attention: [false, false]
        if _ANY not in allowed and not all(any(_same(v, a) for a in allowed) for v in values):
            raise CarraraError(
                f"{class_name} config field {key}={value!r} is not supported (carrara needs {allowed[0]!r})")
    return cls(**{k: _freeze(v) for k, v in data.items() if k in names})


def _config_to_dict(cfg, fixed: dict[str, tuple], class_name: str) -> dict:
    out = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION}
    out.update({k: _thaw(v) for k, v in dataclasses.asdict(cfg).items()})
    out.update({k: allowed[0] for k, allowed in fixed.items()})
    return dict(sorted(out.items()))


def _per_block(cfg, name: str, n: int) -> tuple:
    """An int-or-tuple field expanded to one value per resolution level (checked for length)."""
    value = getattr(cfg, name)
    if isinstance(value, tuple):
        if len(value) != n:
            raise CarraraError(f"{type(cfg).__name__} config field {name} has {len(value)} entries, "
                               f"expected {n} (one per block)")
        return value
    return (value,) * n


_KINDS = {
    "int ≥ 1": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "int ≥ 0": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "number or null": lambda v: v is None or _KINDS["number"](v),
    "true/false": lambda v: isinstance(v, bool),
}


def _check_types(cfg, **kinds: tuple[str, ...]) -> None:
    """Each field listed under a kind (`int_pos=...`, see `_KINDS`) holds a value of that kind."""
    names = {"int_pos": "int ≥ 1", "int": "int ≥ 0", "number": "number", "nullable": "number or null",
             "bool": "true/false"}
    for key, fields in kinds.items():
        for name in fields:
            value = getattr(cfg, name)
            if not _KINDS[names[key]](value):
                raise CarraraError(f"{cfg._class_name} config field {name}={value!r} must be "
                                   f"{names[key]}")


def _check_channels(block_out_channels: tuple, groups: int, cls_name: str) -> None:
    if not block_out_channels or any(not isinstance(c, int) or c <= 0 for c in block_out_channels):
        raise CarraraError(
            f"{cls_name} config field block_out_channels must be positive ints, got {block_out_channels}")
    if len(block_out_channels) > MAX_LEVELS or max(block_out_channels) > MAX_CHANNELS:
        raise CarraraError(f"{cls_name} config field block_out_channels={list(block_out_channels)} is too large "
                           f"(at most {MAX_LEVELS} levels of at most {MAX_CHANNELS} channels)")
    if not isinstance(groups, int) or groups <= 0 or any(c % groups for c in block_out_channels):
        raise CarraraError(f"{cls_name} config field norm_num_groups={groups} must divide every block_out_channels "
                           f"{block_out_channels}")


def _check_sample_size(cfg, limit: int, *, optional: bool = False) -> None:
    """sample_size is a side (int) or [height, width], each between 1 and `limit`."""
    value = cfg.sample_size
    if value is None and optional:
        return
    sides = value if isinstance(value, tuple) and len(value) == 2 else (value,)
    if not all(_KINDS["int ≥ 1"](v) for v in sides):
        raise CarraraError(f"{cfg._class_name} config field sample_size={_thaw(value)!r} must be a "
                           "positive int or [height, width]")
    if max(sides) > limit:
        raise CarraraError(f"{cfg._class_name} config field sample_size={_thaw(value)!r} is too "
                           f"large (at most {limit})")


def _check_parameters(cfg) -> None:
    """Refuse a config whose network would have more than MAX_PARAMETERS weights, before building it."""
    n = cfg.estimate_parameters()
    if n > MAX_PARAMETERS:
        raise CarraraError(f"{cfg._class_name} config describes a network of ~{n:.2g} parameters, "
                           f"more than the limit of {MAX_PARAMETERS:.0e}: check block_out_channels, "
                           "layers_per_block and the channel counts")


def _resnet_weights(c_in: int, c_out: int, temb: int) -> int:
    """Weights of a ResnetBlock2D: two 3×3 convolutions, the time projection, a 1×1 shortcut if c_in ≠ c_out."""
    return 9 * c_in * c_out + 9 * c_out * c_out + temb * c_out + (c_in * c_out if c_in != c_out else 0)


def _transformer_weights(c: int, context: int, depth: int) -> int:
    """Weights of a Transformer2DModel: proj_in/out, then per block self-attention (4c²), cross-attention
    (2c² + 2c·context) and the GEGLU feed-forward (8c² + 4c²)."""
    return 2 * c * c + depth * (18 * c * c + 2 * c * context)


class DiffusersConfig:
    """Reading and writing a diffusers `config.json` for a config dataclass with `_fixed` and `_class_name`."""

    _fixed: dict = {}  # noqa: RUF012 (a class-level table, never mutated)
    _class_name = ""

    @classmethod
    def from_diffusers_config(cls, src: dict | str | os.PathLike):
        """From a diffusers config dict, `config.json` path, or folder holding one."""
        return _config_from_dict(cls, src, cls._fixed, cls._class_name)

    def to_diffusers_config(self) -> dict:
        """The diffusers `config.json` dict for this config (loadable by the diffusers class's `from_config`)."""
        return _config_to_dict(self, self._fixed, self._class_name)


@dataclass
class AutoencoderConfig(DiffusersConfig):
    """Shape of the KL autoencoder (Rombach et al. 2022 §3.1); fields are diffusers' `AutoencoderKL` config keys.

    Latents for the diffusion model are z' = (z − shift_factor) · scaling_factor (shift 0 when None); callers apply
    this, the autoencoder itself works on unscaled z. The image is downsampled by f = 2^(len(block_out_channels)−1).
    """

    _fixed = _FIXED_VAE
    _class_name = "AutoencoderKL"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels", "sample_size"):
            setattr(self, name, _freeze(getattr(self, name)))
        n = len(self.block_out_channels)
        _check_types(self, int_pos=("in_channels", "out_channels", "layers_per_block", "latent_channels"),
                     number=("scaling_factor",), nullable=("shift_factor",),
                     bool=("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"))
        _check_channels(self.block_out_channels, self.norm_num_groups, "AutoencoderKL")
        for name, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(self, name)
            if len(types) != n or any(t != kind for t in types):
                raise CarraraError(f"AutoencoderKL config field {name}={list(types)} is not supported "
                                   f"(carrara needs {n}× {kind!r}, one per block_out_channels)")
        if self.act_fn not in _ACTIVATIONS:
            raise CarraraError(f"AutoencoderKL config field act_fn={self.act_fn!r} is not supported (use 'silu')")
        _check_sample_size(self, MAX_IMAGE_SIDE)
        _check_parameters(self)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def estimate_parameters(self) -> int:
        """The convolution and linear weights of encoder + decoder (biases and norms, < 1 %, left out)."""
        ch, L, lat = self.block_out_channels, self.layers_per_block, self.latent_channels
        mid = 2 * _resnet_weights(ch[-1], ch[-1], 0) + 4 * ch[-1] ** 2
        n = 9 * self.in_channels * ch[0] + 9 * ch[-1] * 2 * lat + 4 * lat * lat  # conv_in, conv_out, quant convs
        n += 9 * lat * ch[-1] + 9 * ch[0] * self.out_channels + 2 * mid  # decoder conv_in, conv_out; both mid blocks
        for i, c in enumerate(ch):
            c_prev, c_next = ch[max(i - 1, 0)], ch[min(i + 1, len(ch) - 1)]
            n += _resnet_weights(c_prev, c, 0) + (L - 1) * _resnet_weights(c, c, 0)  # encoder level
            n += _resnet_weights(c_next, c, 0) + L * _resnet_weights(c, c, 0)  # decoder level: one more ResBlock
            n += 9 * c * c * ((i < len(ch) - 1) + (i > 0))  # encoder downsampler, decoder upsampler
        return n



@dataclass
class UNetConfig(DiffusersConfig):
    """Shape of the conditional U-Net noise predictor; fields are diffusers' `UNet2DConditionModel` config keys.

    Defaults are diffusers' (the Stable Diffusion 1.x layout). As in diffusers, `attention_head_dim` is really the
    number of attention heads per block (the "naming quirk", diffusers issue #2011); head size = channels // heads.
    """

    _fixed = _FIXED_UNET
    _class_name = "UNet2DConditionModel"

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    # "projection": a pooled text embedding (B, projection_class_embeddings_input_dim) passed as `class_labels`
    # goes through an MLP and is added to the time embedding (Imagen §2.2's pooled vector; SDXL's text_embeds);
    # "timestep": a level (B,) embedded like t, then an MLP (a cascade stage's augmentation level).
    class_embed_type: str | None = None
    projection_class_embeddings_input_dim: int | None = None
    # "scale_shift": AdaGN, the time embedding scales and shifts each ResBlock's normalized features (Dhariwal &
    # Nichol 2021 §3.1); "default": it is added to them (Ho et al. 2020)
    resnet_time_scale_shift: str = "default"
    # the width of a second embedding added to the time embedding's input: LCM's guidance-scale embedding of a
    # distilled student (Luo et al. 2023; models/blocks.guidance_embedding), None for an ordinary U-Net
    time_cond_proj_dim: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _freeze(getattr(self, f.name)))
        n = len(self.block_out_channels)
        _check_types(self, int_pos=("in_channels", "out_channels", "cross_attention_dim"), int=("downsample_padding",),
                     number=("freq_shift", "mid_block_scale_factor", "dropout", "norm_eps"),
                     bool=("flip_sin_to_cos", "use_linear_projection", "upcast_attention"))
        _check_channels(self.block_out_channels, self.norm_num_groups, "UNet2DConditionModel")
        kinds = {"down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                 "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}
        for name, allowed in kinds.items():
            types = getattr(self, name)
            if len(types) != n or any(t not in allowed for t in types):
                raise CarraraError(f"UNet2DConditionModel config field {name}={list(types)} is not supported "
                                   f"(carrara needs {n} of {allowed})")
        if self.act_fn not in _ACTIVATIONS:
            raise CarraraError(
                f"UNet2DConditionModel config field act_fn={self.act_fn!r} is not supported (use 'silu')")
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            if any(not isinstance(v, int) or v < 1 for v in _per_block(self, name, n)):
                raise CarraraError(f"UNet2DConditionModel config field {name}={getattr(self, name)!r} must be "
                                   f"positive ints")
        if self.class_embed_type not in (None, "projection", "timestep"):
            raise CarraraError(f"UNet2DConditionModel config field class_embed_type={self.class_embed_type!r} is not "
                               "supported (carrara implements None, 'projection' and 'timestep')")
        dim = self.projection_class_embeddings_input_dim
        if (self.class_embed_type == "projection") != (dim is not None) or not (dim is None or _KINDS["int ≥ 1"](dim)):
            raise CarraraError("UNet2DConditionModel config: class_embed_type='projection' needs "
                               f"projection_class_embeddings_input_dim, a positive int (got {dim!r})")
        if self.resnet_time_scale_shift not in TIME_SCALE_SHIFT:
            raise CarraraError(f"UNet2DConditionModel config field resnet_time_scale_shift="
                               f"{self.resnet_time_scale_shift!r} is not supported (use one of {TIME_SCALE_SHIFT})")
        if not (self.time_cond_proj_dim is None or _KINDS["int ≥ 1"](self.time_cond_proj_dim)):
            raise CarraraError(f"UNet2DConditionModel config field time_cond_proj_dim={self.time_cond_proj_dim!r} "
                               "must be a positive int or null")
        _check_sample_size(self, MAX_LATENT_SIDE, optional=True)
        _check_parameters(self)

    def per_block(self, name: str) -> tuple:
        """`layers_per_block`, `transformer_layers_per_block` or `attention_head_dim`, one value per level."""
        return _per_block(self, name, len(self.block_out_channels))

    def estimate_parameters(self) -> int:
        """The convolution and linear weights of the network (biases and norms, < 1 %, left out)."""
        ch, D, temb = self.block_out_channels, self.cross_attention_dim, 4 * self.block_out_channels[0]
        rt = temb * (1 + (self.resnet_time_scale_shift == "scale_shift"))  # a ResBlock's time projection (AdaGN: 2×)
        L, T = self.per_block("layers_per_block"), self.per_block("transformer_layers_per_block")
        n = 9 * self.in_channels * ch[0] + 9 * ch[0] * self.out_channels + ch[0] * temb + temb * temb
        n += (self.time_cond_proj_dim or 0) * ch[0]
        n += ((self.projection_class_embeddings_input_dim or 0) + temb) * temb * (self.class_embed_type == "projection")
        n += 2 * _resnet_weights(ch[-1], ch[-1], rt) + _transformer_weights(ch[-1], D, T[-1])  # mid block
        for i, (c, down, up) in enumerate(zip(ch, self.down_block_types, reversed(self.up_block_types))):
            c_prev, c_next = ch[max(i - 1, 0)], ch[min(i + 1, len(ch) - 1)]
            n += _resnet_weights(c_prev, c, rt) + (L[i] - 1) * _resnet_weights(c, c, rt)  # down level
            n += L[i] * _transformer_weights(c, D, T[i]) * (down == "CrossAttnDownBlock2D")
            # up level: L + 1 ResBlocks on [x, skip] concatenations: x from the level below first, the last skip
            # from the level above
            n += _resnet_weights(c_next + c, c, rt) + (L[i] - 1) * _resnet_weights(2 * c, c, rt)
            n += _resnet_weights(c + c_prev, c, rt)
            n += (L[i] + 1) * _transformer_weights(c, D, T[i]) * (up == "CrossAttnUpBlock2D")
            n += 9 * c * c * ((i < len(ch) - 1) + (i > 0))  # downsampler, upsampler
        return n



def default_unet_config() -> UNetConfig:
    """A 26M-parameter U-Net for 16×16×4 latents conditioned on MiniLM token states (384-d).

    Cross-attention at all three resolutions (16², 8², 4² tokens), 32-d heads; ~0.9 GMAC per sample.
    """
    return UNetConfig(
        sample_size=16,
        block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        attention_head_dim=(2, 4, 8),  # diffusers' name; it is the number of heads per level
        cross_attention_dim=384,
        use_linear_projection=True,
    )


def default_autoencoder_config() -> AutoencoderConfig:
    """A small f=4 KL autoencoder, 64×64×3 ↔ 16×16×4; `scaling_factor` is set after training (1/std of latents)."""
    return AutoencoderConfig(
        sample_size=64,
        block_out_channels=(64, 128, 256),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        scaling_factor=1.0,
        force_upcast=False,
    )
