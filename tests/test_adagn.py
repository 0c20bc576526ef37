"""AdaGN (Dhariwal & Nichol 2021 §3.1): the U-Net with resnet_time_scale_shift="scale_shift" against diffusers'."""
import diffusers
import pytest
import torch
from reference import randomize_, reference_pair, shapes
from test_unet import TINY, TINY_B, TOL, inputs

from carrara.errors import CarraraError
from carrara.models import UNet2DConditionModel, UNetConfig
from carrara.models.blocks import ResnetBlock2D


@pytest.mark.parametrize("config", [TINY, TINY_B], ids=["tiny", "tiny_linear"])
def test_scale_shift_unet_matches_diffusers(config):
    config = {**config, "resnet_time_scale_shift": "scale_shift"}
    theirs, ours = reference_pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, UNetConfig, config)
    assert shapes(ours) == shapes(theirs)
    proj = ours.down_blocks[0].resnets[0].time_emb_proj
    assert proj.out_features == 2 * proj.in_features // 4  # scale and shift for each of the C0 channels
    x, t, text = inputs(config)
    with torch.no_grad():
        for timestep in (t, 500, 250.5):
            ref = theirs(x, timestep, text).sample
            assert ref.abs().max() > 0.1
            assert (ours(x, timestep, text) - ref).abs().max() <= TOL
        # the comparison can tell: a wrong shift (the additive form's place for it) moves the output
        block = ours.mid_block.resnets[0]
        block.time_emb_proj.bias.data[block.time_emb_proj.out_features // 2:] += 0.05
        assert (ours(x, t, text) - theirs(x, t, text).sample).abs().max() > 10 * TOL


def test_adagn_is_norm_times_one_plus_scale_plus_shift():
    """One block by hand: h = GroupNorm(conv1(silu(GN(x)))) · (1 + y_s) + y_b, then silu, conv2, residual."""
    block = randomize_(ResnetBlock2D(8, 8, 12, groups=4, eps=1e-5, time_scale_shift="scale_shift"))
    g = torch.Generator().manual_seed(0)
    x, temb = torch.randn(2, 8, 5, 5, generator=g), torch.randn(2, 12, generator=g)
    with torch.no_grad():
        h = block.conv1(torch.nn.functional.silu(block.norm1(x)))
        scale, shift = block.time_emb_proj(torch.nn.functional.silu(temb)).chunk(2, dim=1)
        h = block.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        expected = x + block.conv2(torch.nn.functional.silu(h))
        assert torch.allclose(block(x, temb), expected, atol=1e-5)
        # the additive block with the same first half of the projection differs: the test above can tell them apart
        plain = ResnetBlock2D(8, 8, 12, groups=4, eps=1e-5)
        state = dict(block.state_dict())
        state["time_emb_proj.weight"], state["time_emb_proj.bias"] = (state["time_emb_proj.weight"][:8],
                                                                      state["time_emb_proj.bias"][:8])
        plain.load_state_dict(state)
        assert (plain(x, temb) - expected).abs().max() > 1e-2


def test_scale_shift_round_trips_through_config_json(tmp_path):
    cfg = UNetConfig.from_diffusers_config({**TINY, "resnet_time_scale_shift": "scale_shift"})
    UNet2DConditionModel(cfg).save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    assert loaded.config.resnet_time_scale_shift == "scale_shift"
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path)
    assert theirs.config.resnet_time_scale_shift == "scale_shift"
    with pytest.raises(CarraraError, match="resnet_time_scale_shift"):
        UNetConfig.from_diffusers_config({**TINY, "resnet_time_scale_shift": "ada_group"})
