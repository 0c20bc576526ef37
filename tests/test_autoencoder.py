"""The KL autoencoder against diffusers' AutoencoderKL: same state dict, same outputs, same config.json."""
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from reference import randomize_, reference_pair, shapes

from carrara.errors import CarraraError
from carrara.models import (
    AutoencoderConfig,
    AutoencoderKL,
    count_parameters,
    default_autoencoder_config,
)

TOL = 1e-4  # max abs difference allowed against diffusers in fp32

TINY = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4,
    "sample_size": 16, "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
}
TINY_B = {  # the other options: 3 levels, 2 layers, no mid attention, no quant convs, other channels
    "block_out_channels": [16, 32, 32], "layers_per_block": 2, "norm_num_groups": 16, "latent_channels": 3,
    "in_channels": 1, "out_channels": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "mid_block_add_attention": False, "use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": 0.5,
    "shift_factor": 0.1, "force_upcast": False,
}
# Stable Diffusion 1.x `vae/config.json`, verbatim.
SD_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def pair(config: dict, seed: int = 0):
    return reference_pair(diffusers.AutoencoderKL, AutoencoderKL, AutoencoderConfig, config, seed)


def image(config: dict, size=16, batch=2):
    return torch.randn(batch, config.get("in_channels", 3), size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("config", [TINY, TINY_B], ids=["tiny", "tiny_b"])
def test_matches_diffusers_tiny(config):
    theirs, ours = pair(config)
    assert shapes(ours) == shapes(theirs)
    x = image(config)
    with torch.no_grad():
        ref, post = theirs.encode(x).latent_dist, ours.encode(x)
        assert ref.mean.abs().max() > 0.1
        for name in ("mean", "logvar", "std"):
            assert (getattr(post, name) - getattr(ref, name)).abs().max() <= TOL
        assert (post.kl() - ref.kl()).abs().max() <= TOL * ref.kl().abs().max()
        z_ref = ref.sample(torch.Generator().manual_seed(5))
        assert (post.sample(torch.Generator().manual_seed(5)) - z_ref).abs().max() <= TOL
        assert (ours.decode(z_ref) - theirs.decode(z_ref).sample).abs().max() <= TOL
        assert (ours(x) - theirs(x).sample).abs().max() <= TOL
        sampled = theirs(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
        assert (ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)) - sampled).abs().max() <= TOL
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    assert post.mean.shape == (2, config["latent_channels"], 16 // factor, 16 // factor)


def test_comparison_is_sensitive_to_a_wrong_weight_or_layout():
    theirs, ours = pair(TINY)
    x = image(TINY)
    with torch.no_grad():
        ref = theirs(x).sample
        ours.encoder.mid_block.attentions[0].to_v.weight[0, 0] += 0.05  # one weight of the mid attention
        assert (ours(x) - ref).abs().max() > 10 * TOL
        state, swapped = theirs.state_dict(), dict(theirs.state_dict())
        for a, b in (("resnets.0", "resnets.1"),):  # the two decoder mid ResBlocks exchanged (shapes agree)
            for k in (k for k in state if k.startswith(f"decoder.mid_block.{a}.")):
                swapped[k], swapped[k.replace(a, b)] = state[k.replace(a, b)], state[k]
        ours.load_state_dict(swapped)
        assert (ours(x) - ref).abs().max() > 10 * TOL


def test_matches_diffusers_sd_vae_size():
    """The real SD 1.x VAE shape (84M parameters, random weights) on one 64×64 image."""
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL.from_config(SD_VAE)
        ours = AutoencoderKL(AutoencoderConfig.from_diffusers_config(SD_VAE))
    randomize_(theirs.to_empty(device="cpu"))
    assert shapes(ours) == shapes(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    assert count_parameters(ours) == count_parameters(theirs) == 83_653_863
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = theirs.encode(x).latent_dist.mean
        assert z.shape == (1, 4, 8, 8) and (ours.eval().encode(x).mean - z).abs().max() <= TOL
        assert (ours.decode(z) - theirs.decode(z).sample).abs().max() <= TOL
    del theirs, ours


def test_config_round_trip_with_diffusers(tmp_path):
    for config in (TINY, TINY_B, SD_VAE):
        ours_cfg = AutoencoderConfig.from_diffusers_config(config)
        exported = ours_cfg.to_diffusers_config()
        assert json.loads(json.dumps(exported)) == exported
        with torch.device("meta"):
            theirs = diffusers.AutoencoderKL.from_config(exported)
            ours = AutoencoderKL(ours_cfg)
        assert shapes(theirs) == shapes(ours)
        assert AutoencoderConfig.from_diffusers_config(dict(theirs.config)) == ours_cfg
        (tmp_path / "config.json").write_text(json.dumps(exported))
        assert AutoencoderConfig.from_diffusers_config(tmp_path / "config.json") == ours_cfg


@pytest.mark.parametrize("field, value", [
    ("down_block_types", ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]), ("up_block_types", ["UpDecoderBlock2D"]),
    ("act_fn", "relu"), ("latents_mean", [0.1, 0.2, 0.3, 0.4]), ("norm_num_groups", 5), ("unknown_key", 3),
    ("layers_per_block", 0), ("scaling_factor", "0.18"), ("mid_block_add_attention", None),
])
def test_unsupported_config_is_refused_naming_the_field(field, value):
    with pytest.raises(CarraraError, match=field):
        AutoencoderConfig.from_diffusers_config({**TINY, field: value})


def test_save_and_load_pretrained(tmp_path):
    theirs, ours = pair(TINY)
    ours.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderKL.from_pretrained(tmp_path)  # a pipeline folder: finds vae/
    assert loaded.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))
    x = image(TINY)
    with torch.no_grad():
        assert torch.equal(diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae")(x).sample, theirs(x).sample)
        theirs.save_pretrained(tmp_path / "theirs")
        assert torch.equal(AutoencoderKL.from_pretrained(tmp_path / "theirs")(x), ours(x))


def test_loads_deprecated_attention_names(tmp_path):
    """Older diffusers checkpoints (e.g. SD 1.x VAEs) name the mid attention query/key/value/proj_attn."""
    from safetensors.torch import save_file

    _, ours = pair(TINY)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in ours.state_dict().items():
        for new_name, old_name in old.items():
            k = k.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
        state[k] = v
    assert any(".query." in k for k in state)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(ours.config.to_diffusers_config()))
    loaded = AutoencoderKL.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(CarraraError, match="no config.json"):
        AutoencoderKL.from_pretrained(tmp_path)
    AutoencoderKL(AutoencoderConfig.from_diffusers_config(TINY)).save_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CarraraError, match="not found"):
        AutoencoderKL.from_pretrained(tmp_path)
    from carrara.models import UNet2DConditionModel

    with pytest.raises(CarraraError, match="not a UNet2DConditionModel"):
        UNet2DConditionModel.from_pretrained(tmp_path / "vae")


def test_bf16_autocast_and_channels_last():
    _, ours = pair(TINY)
    x = image(TINY)
    with torch.no_grad():
        ref = ours(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours(x)
        assert low.shape == ref.shape
        assert (low.float() - ref).abs().max() <= 0.05 * ref.abs().max()  # bf16 keeps 8 bits of mantissa
        ours.to(memory_format=torch.channels_last)
        assert (ours(x.to(memory_format=torch.channels_last)) - ref).abs().max() <= TOL


def test_default_config_is_f4():
    cfg = default_autoencoder_config()
    model = AutoencoderKL(cfg).eval()
    assert cfg.downsample_factor == 4 and 5e6 <= count_parameters(model) <= 15e6
    with torch.no_grad():
        z = model.encode(torch.randn(1, 3, 64, 64)).mean
        assert z.shape == (1, 4, 16, 16) and model.decode(z).shape == (1, 3, 64, 64)
    assert AutoencoderConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg
