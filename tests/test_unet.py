"""The U-Net against diffusers' UNet2DConditionModel: same state dict, same outputs, same config.json."""
import dataclasses
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from reference import randomize_, reference_pair, shapes

from carrara.errors import CarraraError
from carrara.models import UNet2DConditionModel, UNetConfig, count_parameters, default_unet_config

TOL = 1e-4  # max abs difference allowed against diffusers in fp32

# (a) tiny: one cross-attention and one plain level, tuple heads, 1×1-conv projections.
TINY = {
    "sample_size": 8, "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
    "cross_attention_dim": 16, "attention_head_dim": [2, 4],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
# (a') tiny, the other options: linear projections, 2 transformer layers, plain first level, padding 0, ...
TINY_B = {
    "sample_size": 8, "block_out_channels": [32, 32, 64], "layers_per_block": [2, 1, 1], "norm_num_groups": 32,
    "norm_eps": 1e-6, "cross_attention_dim": 24, "attention_head_dim": 4, "transformer_layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True, "upcast_attention": True, "flip_sin_to_cos": False, "freq_shift": 1,
    "downsample_padding": 0, "mid_block_scale_factor": 1.5, "in_channels": 3, "out_channels": 5,
}
# (b) Stable Diffusion 1.5 `unet/config.json`, verbatim.
SD15 = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def pair(config: dict, seed: int = 0):
    return reference_pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, UNetConfig, config, seed)


def inputs(cfg: dict, batch=2, size=(8, 8), tokens=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.get("in_channels", 4), *size, generator=g)
    text = torch.randn(batch, tokens, cfg["cross_attention_dim"], generator=g)
    return x, torch.tensor([3, 917])[:batch], text


@pytest.mark.parametrize("config", [TINY, TINY_B], ids=["tiny", "tiny_linear"])
def test_matches_diffusers_tiny(config):
    theirs, ours = pair(config)
    assert shapes(ours) == shapes(theirs)
    x, t, text = inputs(config)
    with torch.no_grad():
        for timestep in (t, 500, 250.5, torch.tensor(42)):
            ref = theirs(x, timestep, text).sample
            assert ref.abs().max() > 0.1  # a meaningful signal, not a collapsed output
            assert (ours(x, timestep, text) - ref).abs().max() <= TOL
        x_odd = torch.randn(1, x.shape[1], 7, 9)  # not divisible by 2^levels: upsample to the skip's size
        assert (ours(x_odd, t[:1], text[:1]) - theirs(x_odd, t[:1], text[:1]).sample).abs().max() <= TOL


def test_attention_mask_matches_diffusers_and_hides_tokens():
    theirs, ours = pair(TINY)
    x, t, text = inputs(TINY)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    with torch.no_grad():
        out = ours(x, t, text, encoder_attention_mask=mask)
        ref = theirs(x, t, text, encoder_attention_mask=mask).sample
        assert (out - ref).abs().max() <= TOL
        assert (out[0] - ours(x, t, text)[0]).abs().max() > 1e-2  # the mask changes sample 0 ...
        assert (out[1] - ours(x, t, text)[1]).abs().max() <= TOL  # ... not the fully kept sample 1
        none = torch.zeros_like(mask)  # every token masked: a finite bias keeps the output finite, as in diffusers
        assert (ours(x, t, text, none) - theirs(x, t, text, encoder_attention_mask=none).sample).abs().max() <= TOL
        text2 = text.clone()
        text2[0, 3:] = torch.randn(2, TINY["cross_attention_dim"])  # masked tokens' content is ignored
        assert (ours(x, t, text2, encoder_attention_mask=mask) - out).abs().max() <= TOL


def test_comparison_is_sensitive_to_a_wrong_weight_or_layout():
    theirs, ours = pair(TINY)
    x, t, text = inputs(TINY)
    with torch.no_grad():
        ref = theirs(x, t, text).sample
        ours.up_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight[0, 0] += 0.05  # one weight
        assert (ours(x, t, text) - ref).abs().max() > 10 * TOL
        flipped = UNet2DConditionModel(dataclasses.replace(ours.config, flip_sin_to_cos=False)).eval()
        flipped.load_state_dict(theirs.state_dict())  # same weights, [sin, cos] order instead of [cos, sin]
        assert (flipped(x, t, text) - ref).abs().max() > 10 * TOL
        state, swapped = theirs.state_dict(), dict(theirs.state_dict())
        for q in (k for k in state if ".attn1.to_q." in k):  # self-attention q and k exchanged (shapes agree)
            swapped[q], swapped[q.replace("to_q", "to_k")] = state[q.replace("to_q", "to_k")], state[q]
        ours.load_state_dict(swapped)
        assert (ours(x, t, text) - ref).abs().max() > 10 * TOL


def test_matches_diffusers_sd15_size():
    """The real SD 1.5 U-Net shape (860M parameters, random weights) on a 16×16 latent with 8 text tokens."""
    with torch.device("meta"):  # skip both default initializations; weights come from randomize_
        theirs = diffusers.UNet2DConditionModel.from_config(SD15)
        ours = UNet2DConditionModel(UNetConfig.from_diffusers_config(SD15))
    randomize_(theirs.to_empty(device="cpu"))
    assert shapes(ours) == shapes(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)  # shares the tensors: no second copy
    assert count_parameters(ours) == count_parameters(theirs) == 859_520_964
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 8, 768, generator=g)
    with torch.no_grad():
        ref = theirs(x, torch.tensor([981]), text).sample
        assert (ours.eval()(x, torch.tensor([981]), text) - ref).abs().max() <= TOL
    del theirs, ours


def test_config_round_trip_with_diffusers(tmp_path):
    for config in (TINY, TINY_B, SD15):
        ours_cfg = UNetConfig.from_diffusers_config(config)
        exported = ours_cfg.to_diffusers_config()
        assert json.loads(json.dumps(exported)) == exported  # plain JSON
        with torch.device("meta"):
            theirs = diffusers.UNet2DConditionModel.from_config(exported)
            ours = UNet2DConditionModel(ours_cfg)
        assert shapes(theirs) == shapes(ours)
        assert UNetConfig.from_diffusers_config(dict(theirs.config)) == ours_cfg  # diffusers' full config -> ours
        (tmp_path / "config.json").write_text(json.dumps(exported))
        assert UNetConfig.from_diffusers_config(tmp_path) == ours_cfg  # folder path


@pytest.mark.parametrize("field, value", [
    ("class_embed_type", "simple_projection"), ("addition_embed_type", "text_time"), ("time_cond_proj_dim", 0),
    ("only_cross_attention", True), ("num_attention_heads", 8), ("center_input_sample", True),
    ("resnet_time_scale_shift", "ada_group"), ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
    ("act_fn", "gelu"), ("cross_attention_dim", [16, 16]), ("attention_head_dim", [2, 4, 8]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("no_such_field", 1), ("norm_num_groups", 7),
    ("in_channels", "4"), ("use_linear_projection", 1), ("layers_per_block", [1, 0]),
])
def test_unsupported_config_is_refused_naming_the_field(field, value):
    with pytest.raises(CarraraError, match=field):
        UNetConfig.from_diffusers_config({**TINY, field: value})


def test_save_and_load_pretrained(tmp_path):
    theirs, ours = pair(TINY)
    ours.save_pretrained(tmp_path / "unet")
    files = sorted(p.name for p in (tmp_path / "unet").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)  # a pipeline folder: finds unet/
    assert loaded.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))
    x, t, text = inputs(TINY)
    with torch.no_grad():  # diffusers reads our folder, we read diffusers' folder
        assert torch.equal(diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet")(x, t, text).sample,
                           theirs(x, t, text).sample)
        theirs.save_pretrained(tmp_path / "theirs")
        assert torch.equal(UNet2DConditionModel.from_pretrained(tmp_path / "theirs")(x, t, text), ours(x, t, text))


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(CarraraError, match="not found"):
        UNet2DConditionModel.from_pretrained(tmp_path / "missing")
    UNet2DConditionModel(UNetConfig.from_diffusers_config(TINY)).save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CarraraError, match="cannot read weights"):
        UNet2DConditionModel.from_pretrained(tmp_path)
    UNet2DConditionModel(UNetConfig.from_diffusers_config(TINY_B)).save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(CarraraError, match="do not fit this config"):
        UNet2DConditionModel.from_pretrained(tmp_path / "b")


def test_bf16_autocast_and_channels_last():
    _, ours = pair(TINY)
    x, t, text = inputs(TINY)
    with torch.no_grad():
        ref = ours(x, t, text)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours(x, t, text)
        assert low.dtype == torch.bfloat16 and low.shape == ref.shape
        assert (low.float() - ref).abs().max() <= 0.05 * ref.abs().max()  # bf16 keeps 8 bits of mantissa
        ours.to(memory_format=torch.channels_last)
        out = ours(x.to(memory_format=torch.channels_last), t, text)
        assert (out - ref).abs().max() <= TOL


def test_default_config_size():
    model = UNet2DConditionModel(default_unet_config())
    assert 20e6 <= count_parameters(model) <= 30e6
    with torch.no_grad():
        assert model(torch.randn(2, 4, 16, 16), 10, torch.randn(2, 7, 384)).shape == (2, 4, 16, 16)
