"""The pixel codec: the intermediate product as a small image (Imagen's route) through the latent route's code."""
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_UNET, TINY_VAE

import carrara.upsampler
from carrara.cli import main
from carrara.errors import CarraraError
from carrara.export import export_default
from carrara.images import to_model_range
from carrara.models.autoencoder import AutoencoderKL
from carrara.models.codec import (
    PixelCodec,
    PixelCodecConfig,
    codec_config,
    depth_to_space,
    load_codec,
    pixel_factor,
    space_to_depth,
)
from carrara.models.config import AutoencoderConfig
from carrara.pipeline import Pipeline
from carrara.recipe import run_recipe
from carrara.train.cache import encode_latents
from carrara.train.core import TrainConfig
from carrara.train.diffusion import DiffusionRecipe, fine_tune_recipe, train_diffusion

ROOT = Path(__file__).resolve().parent.parent
TINY_TRAIN = {"steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 2, "checkpoint_every": 4,
              "sample_every": 1000, "bf16": False}


def test_space_to_depth_layout_is_torchs_pixel_unshuffle():
    """Channel c·f² + i·f + j holds pixel (f·y + i, f·x + j) of channel c: a fixed 1×1×4×4 example."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    z = space_to_depth(x, 2)  # (1, 4, 2, 2)
    assert z[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0] and z[0, :, 1, 1].tolist() == [10.0, 11.0, 14.0, 15.0]
    assert carrara.upsampler.space_to_depth is space_to_depth  # moved down a layer, not duplicated
    assert carrara.upsampler.depth_to_space is depth_to_space


@pytest.mark.parametrize("factor", [1, 2])
def test_encode_decode_is_exact(factor):
    codec = PixelCodec(PixelCodecConfig(factor=factor))
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    posterior = codec.encode(x)
    assert posterior.mean.shape == (2, 3 * factor**2, 8 // factor, 8 // factor)
    assert torch.equal(posterior.sample(torch.Generator()), posterior.mean) and torch.equal(posterior.mode(),
                                                                                          posterior.mean)
    assert torch.equal(posterior.std, torch.zeros_like(x).reshape(posterior.mean.shape))
    assert torch.equal(posterior.kl(), torch.zeros(2))
    assert torch.equal(codec.decode(posterior.mean), x) and torch.equal(codec(x), x)
    assert codec.config.downsample_factor == factor and codec.config.latent_channels == 3 * factor**2
    assert codec.config.scaling_factor == 1.0 and sum(p.numel() for p in codec.parameters()) == 0


def test_the_latent_cache_of_pixels_is_the_rearranged_image():
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean, std = encode_latents(PixelCodec(PixelCodecConfig(factor=2)), images, batch_size=2, progress=False)
    assert torch.equal(mean, space_to_depth(to_model_range(images), 2)) and not std.any()


def test_the_codec_folder_round_trips_and_load_codec_tells_the_kinds_apart(tmp_path):
    PixelCodec(PixelCodecConfig(factor=2)).save_pretrained(tmp_path / "pix" / "vae")
    assert sorted(p.name for p in (tmp_path / "pix" / "vae").iterdir()) == ["config.json"]  # no weights file
    config = json.loads((tmp_path / "pix" / "vae" / "config.json").read_text())
    assert config["_class_name"] == "CarraraPixelCodec" and config["factor"] == 2
    for folder in (tmp_path / "pix", tmp_path / "pix" / "vae"):  # a model folder or its vae/
        codec = load_codec(folder)
        assert isinstance(codec, PixelCodec) and codec.config == PixelCodecConfig(factor=2)
    assert isinstance(codec_config(tmp_path / "pix"), PixelCodecConfig)
    AutoencoderKL(AutoencoderConfig(**TINY_VAE)).save_pretrained(tmp_path / "kl" / "vae")
    assert isinstance(load_codec(tmp_path / "kl"), AutoencoderKL)
    assert codec_config(tmp_path / "kl").downsample_factor == 2


@pytest.mark.parametrize("config, match", [
    ({"_class_name": "VQModel"}, "not a first stage carrara knows"),
    ({"_class_name": "CarraraPixelCodec", "factor": 0}, "factor"),
    ({"_class_name": "CarraraPixelCodec", "factor": 2, "scaling_factor": -1.0}, "scaling_factor"),
    ({"_class_name": "CarraraPixelCodec", "factor": 2, "block_out_channels": [8]}, "unknown to carrara"),
])
def test_a_bad_codec_config_is_one_error(tmp_path, config, match):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CarraraError, match=match):
        load_codec(tmp_path)


def test_pixel_specs():
    assert (pixel_factor("pixels"), pixel_factor("pixels:2"), pixel_factor("runs/ae"), pixel_factor("./pixels")) == (
        1, 2, None, None)
    for bad in ("pixels:0", "pixels:x", "pixels:", "pixels:9"):
        with pytest.raises(CarraraError, match="pixels:F"):
            pixel_factor(bad)
    with pytest.raises(CarraraError, match="divisible by 2"):
        train_diffusion(DiffusionRecipe(data="nowhere", autoencoder="pixels:2", size=15), "unused")


@pytest.fixture(scope="module", params=[1, 2], ids=["f1", "f2"])
def pixel_run(request, tiny_shapes, tmp_path_factory):
    """A 4-step pixel-space diffusion run on tiny_shapes (16 px), trained through the CLI."""
    factor = request.param
    run = tmp_path_factory.mktemp(f"pixels{factor}")
    spec = "pixels" if factor == 1 else f"pixels:{factor}"
    argv = ["train", "diffusion", "--data", str(tiny_shapes), "--autoencoder", spec, "--size", "16", "--out",
            str(run), "--quiet", "--set", f"model={json.dumps(TINY_UNET)}", "--set", "schedule=cosine",
            "--set", "prediction_type=v_prediction", "--set", 'sample_prompts=["a red circle"]']
    argv += [a for k, v in TINY_TRAIN.items() for a in ("--set", f"train.{k}={json.dumps(v)}")]
    assert main(argv) == 0
    return run, factor


def test_a_pixel_run_trains_saves_loads_and_generates(pixel_run):
    run, f = pixel_run
    assert json.loads((run / "vae" / "config.json").read_text())["_class_name"] == "CarraraPixelCodec"
    assert json.loads((run / "model_index.json").read_text())["vae"] == ["carrara", "CarraraPixelCodec"]
    pipe = Pipeline.load(run, precision="fp32")
    assert isinstance(pipe.vae, PixelCodec) and pipe.vae.config.factor == f
    assert pipe.unet.config.in_channels == 3 * f * f and pipe.unet.config.sample_size == 16 // f
    assert pipe.sizes == (16,)
    z = pipe(["a red circle", "a blue square"], steps=2, seed=3, output="latent")
    images = pipe(["a red circle", "a blue square"], steps=2, seed=3, output="tensor")
    assert z.shape == (2, 3 * f * f, 16 // f, 16 // f) and images.shape == (2, 3, 16, 16)
    assert torch.equal(images, depth_to_space(z, f).clamp(-1, 1))  # the image is the generated tensor, rearranged
    assert [im.size for im in pipe(["a red circle"], steps=2)] == [(16, 16)]


def test_a_pixel_model_exports_as_a_carrara_folder_but_not_to_diffusers(pixel_run, tmp_path, capsys):
    run, _ = pixel_run
    export_default(run, tmp_path / "packaged")
    assert isinstance(Pipeline.load(tmp_path / "packaged").vae, PixelCodec)
    assert main(["export", "diffusers", "--model", str(run), "--out", str(tmp_path / "sd")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("carrara: error:") and "KL autoencoder" in err
    assert not (tmp_path / "sd").exists()


def test_a_pixel_model_fine_tunes_at_its_own_size(pixel_run, tiny_shapes, tmp_path):
    run, f = pixel_run
    with pytest.raises(CarraraError, match="makes 16-pixel images"):
        fine_tune_recipe(str(tiny_shapes), str(run), size=32)
    recipe = fine_tune_recipe(str(tiny_shapes), str(run))
    recipe.train = TrainConfig(**{**TINY_TRAIN, "steps": 2})
    assert recipe.size == 16
    train_diffusion(recipe, tmp_path / "tuned", progress=False)
    tuned = Pipeline.load(tmp_path / "tuned", precision="fp32")
    assert isinstance(tuned.vae, PixelCodec) and tuned.vae.config.factor == f
    assert not (tmp_path / "tuned" / "vae" / "diffusion_pytorch_model.safetensors").exists()


def test_img2img_without_a_step_and_inpainting_keep_the_pixels_exactly(pixel_run):
    """The codec is exact, so an edit that runs no step gives the init image back, and inpainting keeps its
    unmasked pixels (a KL autoencoder would give its reconstruction)."""
    run, _ = pixel_run
    pipe = Pipeline.load(run, precision="fp32")
    init = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    same = pipe(["a red circle"], steps=4, init_image=init, strength=0.01, output="tensor")
    assert torch.equal(same, init)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1.0  # regenerate the left half
    edited = pipe(["a red circle"], steps=2, init_image=init, mask=mask, output="tensor")
    assert torch.equal(edited[..., 8:], init[..., 8:]) and not torch.equal(edited[..., :8], init[..., :8])


def test_a_recipe_in_pixel_space_skips_the_autoencoder_and_builds_the_cascade(tmp_path):
    """recipes/shapes-imagen.toml's stages at a tiny scale: a 16-px pixel base + a 16 → 32 upsampler."""
    tiny = {**TINY_UNET, "class_embed_type": "timestep"}
    sets = ["data.n=16", "data.size=16", f"diffusion.model={json.dumps(TINY_UNET)}", "upsampler.size=32",
            "upsampler.crop=16", f"upsampler.model={json.dumps(tiny)}", "upsampler.sampling.steps=2",
            'diffusion.sample_prompts=["a red circle"]']
    sets += [f"{stage}.train.{k}={json.dumps(v)}" for stage in ("diffusion", "upsampler") for k, v in TINY_TRAIN.items()]
    result = run_recipe(ROOT / "recipes" / "shapes-imagen.toml", tmp_path / "out", overrides=sets, progress=False)
    assert result["autoencoder"] == "pixels" and not (tmp_path / "out" / "autoencoder").exists()
    assert (tmp_path / "out" / "data32" / "metadata.jsonl").is_file()  # the upsampler's data at its own size
    pipe = Pipeline.load(result["model"], precision="fp32")
    assert isinstance(pipe.vae, PixelCodec) and pipe.sizes == (16, 32)
    assert pipe(["a red circle"], steps=2, output="tensor").shape == (1, 3, 32, 32)
    assert pipe(["a red circle"], steps=2, output="tensor", size=16).shape == (1, 3, 16, 16)
