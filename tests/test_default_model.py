"""The packaged default model (docs/default-model.md): complete, within its size budget, and what generate uses."""
import json

import numpy as np
import pytest
from PIL import Image

from carrara.cli import main
from carrara.modelfolder import PACKAGED
from carrara.pipeline import Pipeline
from carrara.png import read_png_metadata

DEFAULT = PACKAGED / "default"


def test_default_weights_are_fp16_safetensors_within_60_mb():
    from safetensors import safe_open

    files = sorted(DEFAULT.glob("*/diffusion_pytorch_model.safetensors"))
    assert [f.parent.name for f in files] == ["unet", "vae"]
    assert sum(f.stat().st_size for f in files) <= 60e6
    for f in files:
        with safe_open(f, "pt") as weights:
            assert {str(weights.get_slice(k).get_dtype()) for k in weights.keys()}  # noqa: SIM118 (safe_open has no __iter__) == {"F16"}
    training = DEFAULT / "training"  # the logs the weights came from ship beside them
    for stage in ("autoencoder", "diffusion"):
        assert (training / stage / "loss.png").is_file()
        assert json.loads((training / stage / "config.json").read_text())["stage"] == stage


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load("default")


def test_default_model_makes_64px_images_that_follow_the_prompt(pipe):
    assert pipe.latent_shape() == (4, 16, 16) and pipe.text_encoder.dim == 384
    images = pipe(["cat face", "red heart"], steps=6, seed=0, output="tensor")  # (2, 3, 64, 64) in [-1, 1]
    assert images.shape == (2, 3, 64, 64)
    rgb = (images + 1) / 2
    heart_red = (rgb[1, 0] - rgb[1, 1:].mean(0)).mean()  # a red heart is redder than a cat face is
    cat_red = (rgb[0, 0] - rgb[0, 1:].mean(0)).mean()
    assert heart_red > cat_red + 0.05, (heart_red, cat_red)
    background = rgb[:, :, :3, :].mean()  # emoji are drawn on white: the top rows are near white
    assert background > 0.8


def test_generate_without_model_uses_the_default(tmp_path, pipe):
    assert main(["generate", "red heart", "--steps", "4", "-o", str(tmp_path / "a.png")]) == 0
    meta = read_png_metadata(tmp_path / "a.png")
    assert meta["model"] == "default" and meta["model_hash"] == pipe.model_hash
    want = pipe(["red heart"], steps=4, seed=0)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png").convert("RGB")), np.asarray(want))
