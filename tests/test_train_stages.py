"""Both training stages on a fixed tiny dataset: the loss goes down, resume is exact, runs are model folders."""
import json

import pytest
import torch
from safetensors.torch import load_file

from carrara.data.shapes import build_shapes
from carrara.errors import CarraraError
from carrara.pipeline import Pipeline
from carrara.recipe import apply_overrides
from carrara.train.autoencoder import AutoencoderRecipe, train_autoencoder
from carrara.train.core import TrainConfig
from carrara.train.diffusion import DiffusionRecipe, train_diffusion

TINY_VAE = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "latent_channels": 4, "sample_size": 16}
TINY_UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": [2, 4],
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}


def losses(run) -> list[float]:
    return [json.loads(s)["loss"] for s in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    build_shapes(out, n=48, size=16, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def ae_run(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ae")
    recipe = AutoencoderRecipe(data=str(data), size=16, model=dict(TINY_VAE),
                               train=TrainConfig(steps=60, batch_size=16, lr=2e-3, warmup_steps=5, log_every=5,
                                                 checkpoint_every=30, sample_every=60, bf16=False))
    train_autoencoder(recipe, run, progress=False)
    return run


def diffusion_recipe(data, ae_run, steps=30) -> DiffusionRecipe:
    return DiffusionRecipe(data=str(data), autoencoder=str(ae_run), size=16, model=dict(TINY_UNET),
                           sample_prompts=["a red circle", "a blue square"],
                           train=TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=3, log_every=3,
                                             checkpoint_every=10, sample_every=1000, bf16=False))


def test_autoencoder_loss_goes_down_and_run_has_everything(ae_run):
    curve = losses(ae_run)
    assert curve[-1] < 0.6 * curve[0]
    for name in ("config.json", "log.txt", "loss.png", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"):
        assert (ae_run / name).is_file(), name
    assert list((ae_run / "samples").glob("step_*.png"))
    scale = json.loads((ae_run / "vae" / "config.json").read_text())["scaling_factor"]
    assert 0.05 < scale < 20 and scale != 1.0  # measured 1/std of the latents, not the default


def test_diffusion_loss_goes_down_and_run_is_a_model_folder(data, ae_run, tmp_path):
    train_diffusion(diffusion_recipe(data, ae_run, steps=45), tmp_path, progress=False)
    curve = losses(tmp_path)
    assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:3]) / 3
    pipe = Pipeline.load(tmp_path)
    images = pipe(["a red circle"], steps=3, seed=0)
    assert images[0].size == (16, 16)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["stage"] == "diffusion" and config["cond_dropout"] == 0.1


def test_diffusion_resume_gives_the_same_weights(data, ae_run, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train_diffusion(diffusion_recipe(data, ae_run), full, progress=False)
    train_diffusion(diffusion_recipe(data, ae_run), part, progress=False, stop_at=17)
    train_diffusion(diffusion_recipe(data, ae_run), part, progress=False, resume=True)
    a = load_file(full / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(part / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_diffusion_needs_a_trained_autoencoder(data, tmp_path):
    with pytest.raises(CarraraError, match="no trained autoencoder"):
        train_diffusion(DiffusionRecipe(data=str(data), autoencoder=str(tmp_path)), tmp_path / "run", progress=False)


def test_overrides_reach_nested_fields_and_refuse_unknown_ones():
    recipe = apply_overrides(DiffusionRecipe(), ["train.steps=7", "train.lr=1e-3", "model.layers_per_block=1",
                                                 "cond_dropout=0.2"])
    assert recipe.train.steps == 7 and recipe.train.lr == 1e-3 and recipe.cond_dropout == 0.2
    assert recipe.model["layers_per_block"] == 1
    with pytest.raises(CarraraError, match="unknown setting"):
        apply_overrides(DiffusionRecipe(), ["train.nope=1"])
    with pytest.raises(CarraraError, match="expects int"):
        apply_overrides(DiffusionRecipe(), ["train.steps=many"])
