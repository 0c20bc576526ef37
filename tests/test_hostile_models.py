"""Hostile model folders (issue 15 §3.2, §3.8): absurd sizes in a config.json and a model_index.json of the wrong
shape end in one clear line before anything is allocated, while real Stable Diffusion sizes still load."""
import json
import shutil

import pytest
import torch
from conftest import TINY_UNET, TINY_VAE
from test_cli_generate import write_tiny_model

from carrara.cli import main
from carrara.errors import CarraraError
from carrara.models.autoencoder import AutoencoderKL
from carrara.models.config import MAX_PARAMETERS, AutoencoderConfig, UNetConfig
from carrara.models.unet import UNet2DConditionModel

SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768}  # diffusers' defaults are SD 1.x's layout
SD2_UNET = {"sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True}
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 768,
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model"))


def n_parameters(module_cls, config) -> int:
    with torch.device("meta"):  # shapes only: nothing allocated
        return sum(p.numel() for p in module_cls(config).parameters())


@pytest.mark.parametrize("cls, module_cls, config", [
    (UNetConfig, UNet2DConditionModel, {**TINY_UNET, "sample_size": 8, "cross_attention_dim": 384}),
    (UNetConfig, UNet2DConditionModel, SD15_UNET),
    (UNetConfig, UNet2DConditionModel, SD2_UNET),
    (UNetConfig, UNet2DConditionModel, {**TINY_UNET, "layers_per_block": [1, 3], "transformer_layers_per_block": [2, 1],
                                        "cross_attention_dim": 48}),
    (UNetConfig, UNet2DConditionModel, {**SD15_UNET, "class_embed_type": "projection",
                                        "projection_class_embeddings_input_dim": 768}),
    (AutoencoderConfig, AutoencoderKL, TINY_VAE),
    (AutoencoderConfig, AutoencoderKL, SD_VAE),
])
def test_parameter_estimate_is_within_3_percent(cls, module_cls, config):
    """The estimate counts conv and linear weights only; biases and norms are the rest (< 3 % at 8 channels)."""
    cfg = cls.from_diffusers_config(config)
    real = n_parameters(module_cls, cfg)
    assert 0.97 * real <= cfg.estimate_parameters() <= real


def test_real_stable_diffusion_sizes_are_accepted():
    for config in (SD15_UNET, SD2_UNET, {"sample_size": 128, "cross_attention_dim": 2048}):  # SDXL's latent side
        assert UNetConfig.from_diffusers_config(config).estimate_parameters() < MAX_PARAMETERS / 2
    AutoencoderConfig.from_diffusers_config({**SD_VAE, "sample_size": 1024})


BIG = [100_000, 200_000]


@pytest.mark.parametrize("cls, config, words", [
    (UNetConfig, {"sample_size": 100_000}, "sample_size=100000 is too large (at most 512)"),
    (UNetConfig, {"sample_size": [64, 100_000]}, "sample_size=[64, 100000] is too large"),
    (UNetConfig, {"sample_size": "64"}, "sample_size='64' must be a positive int"),
    (UNetConfig, {"block_out_channels": BIG, "down_block_types": ["DownBlock2D"] * 2,
                  "up_block_types": ["UpBlock2D"] * 2}, "block_out_channels=[100000, 200000] is too large"),
    (UNetConfig, {"layers_per_block": 10_000}, "parameters, more than the limit of 5e+09"),
    (UNetConfig, {"cross_attention_dim": 10**9}, "parameters, more than the limit of 5e+09"),
    (UNetConfig, {"class_embed_type": "projection", "projection_class_embeddings_input_dim": 10**9},
     "parameters, more than the limit of 5e+09"),
    (UNetConfig, {"block_out_channels": [32] * 9, "down_block_types": ["DownBlock2D"] * 9,
                  "up_block_types": ["UpBlock2D"] * 9}, "at most 8 levels"),
    (AutoencoderConfig, {"sample_size": 100_000}, "sample_size=100000 is too large (at most 8192)"),
    (AutoencoderConfig, {"block_out_channels": BIG, "down_block_types": ["DownEncoderBlock2D"] * 2,
                         "up_block_types": ["UpDecoderBlock2D"] * 2}, "block_out_channels=[100000, 200000] is too large"),
    (AutoencoderConfig, {"latent_channels": 10**6}, "parameters, more than the limit of 5e+09"),
])
def test_absurd_sizes_are_refused_before_allocating(cls, config, words):
    with pytest.raises(CarraraError) as info:
        cls.from_diffusers_config(config)
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("part, change, words", [
    ("unet", {"sample_size": 100_000}, "UNet2DConditionModel config field sample_size=100000 is too large"),
    ("unet", {"block_out_channels": BIG}, "block_out_channels=[100000, 200000] is too large"),
    ("vae", {"block_out_channels": BIG}, "AutoencoderKL config field block_out_channels=[100000, 200000] is too"),
])
def test_generate_with_an_absurd_config_is_one_line(model, tmp_path, capsys, part, change, words):
    folder = shutil.copytree(model, tmp_path / "model")
    config_path = folder / part / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    assert main(["generate", "a cat", "--model", str(folder), "--quiet", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("index, words", [
    ({"carrara": "x"}, '"carrara" must be an object'),
    ({"carrara": [1, 2]}, '"carrara" must be an object'),
    ({"carrara": None}, '"carrara" must be an object'),
    ({"carrara": {"text_encoder": 5}}, '"carrara"."text_encoder" must be a text encoder name'),
    ({"carrara": {"text_encoder": ""}}, '"carrara"."text_encoder" must be a text encoder name'),
    ({"carrara": {"text_encoder": ["minilm"]}}, '"carrara"."text_encoder" must be a text encoder name'),
])
def test_model_index_of_the_wrong_shape_is_one_line(model, tmp_path, capsys, index, words):
    folder = shutil.copytree(model, tmp_path / "model")
    (folder / "model_index.json").write_text(json.dumps(index))
    assert main(["generate", "a cat", "--model", str(folder), "--quiet", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model_index.json" in err[0] and words in err[0], err


def test_model_index_without_carrara_uses_minilm(model, tmp_path):
    """The "carrara" object is optional: a folder without it uses the built-in MiniLM, as before."""
    from carrara.modelfolder import resolve

    folder = shutil.copytree(model, tmp_path / "model")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert resolve(folder).text_encoder == "minilm"
