"""The packaged default model (docs/default-model.md): complete, within its size budget, and what generate uses.

Since v2 it is a cascade: a 64-px latent base (v-prediction, pooled text embedding) and a 64 → 128 pixel-space
upsampler; `carrara generate` makes 128-px images with it unless `--size 64`."""
import json

import numpy as np
import pytest
from PIL import Image

from carrara.cli import main
from carrara.modelfolder import PACKAGED
from carrara.pipeline import Pipeline
from carrara.png import read_png_metadata

DEFAULT = PACKAGED / "default"


def test_default_weights_are_fp16_safetensors_within_100_mb():
    from safetensors import safe_open

    files = sorted(DEFAULT.glob("**/diffusion_pytorch_model.safetensors"))
    assert sorted(str(f.parent.relative_to(DEFAULT)) for f in files) == ["unet", "upsampler/unet", "vae"]
    delta = DEFAULT / "student" / "unet" / "delta.safetensors"  # the few-step student: a 4-bit delta (test below)
    assert sorted(DEFAULT.glob("**/*.safetensors")) == sorted([*files, delta])
    assert sum(f.stat().st_size for f in [*files, delta]) <= 100e6
    for f in files:
        with safe_open(f, "pt") as weights:
            dtypes = {str(weights.get_slice(k).get_dtype()) for k in weights.keys()}  # noqa: SIM118 (no __iter__)
            assert dtypes == {"F16"}, (f.parent.name, dtypes)
    training = DEFAULT / "training"  # the logs the weights came from ship beside them, every stage and phase
    for stage in ("autoencoder", "diffusion-init", "diffusion", "upsampler"):
        assert (training / stage / "loss.png").is_file(), stage
        assert json.loads((training / stage / "config.json").read_text())["stage"] == stage.split("-")[0]
    phase2 = json.loads((training / "diffusion" / "config.json").read_text())
    assert phase2["prediction_type"] == "v_prediction" and phase2["pooled"]


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load("default")


def test_default_model_is_a_cascade_from_64_to_128(pipe):
    assert pipe.sizes == (64, 128) and pipe.latent_shape() == (4, 16, 16) and pipe.text_encoder.dim == 384
    big = pipe(["red heart"], steps=4, output="tensor")
    small = pipe(["red heart"], steps=4, output="tensor", size=64)
    assert big.shape == (1, 3, 128, 128) and small.shape == (1, 3, 64, 64)
    # the upsampler enlarges the base's image: box-downsampled back to 64 px, it is close to it
    down = big.reshape(1, 3, 64, 2, 64, 2).mean((3, 5))
    assert (down - small).abs().mean() < 0.1, (down - small).abs().mean()


def test_default_model_makes_images_that_follow_the_prompt(pipe):
    """Over 8 seeds per color, "red …" images are redder (mean R − B) than "blue …" ones by > 3 standard errors.

    A model that ignores its text gives both groups one distribution (the gap's z-score ~ N(0, 1)). Judged on the
    base's 64-px images (the upsampler keeps colours: the test above)."""
    prompts = ["red heart", "blue heart", "red circle", "blue circle"] * 4  # image i has seed i
    images = pipe(prompts, steps=6, seed=0, output="tensor", size=64)  # (16, 3, 64, 64) in [-1, 1]
    assert images.shape == (16, 3, 64, 64)
    rgb = (images + 1) / 2
    red_minus_blue = (rgb[:, 0] - rgb[:, 2]).mean((1, 2))  # (16,)
    red, blue = red_minus_blue[0::2], red_minus_blue[1::2]  # 8 "red …" and 8 "blue …" images
    standard_error = ((red.var() + blue.var()) / 8).sqrt()
    assert red.mean() - blue.mean() > 3 * standard_error, (red, blue)
    assert red.mean() > 0 > blue.mean(), (red.mean(), blue.mean())  # red images are red, blue ones blue
    background = rgb[:, :, :3, :].mean()  # emoji are drawn on white: the top rows are near white
    assert background > 0.8


def test_generate_without_model_uses_the_default(tmp_path, pipe):
    assert main(["generate", "red heart", "--steps", "4", "-o", str(tmp_path / "a.png")]) == 0
    meta = read_png_metadata(tmp_path / "a.png")
    assert meta["model"] == "default" and meta["model_hash"] == pipe.model_hash and meta["size"] == 128
    want = pipe(["red heart"], steps=4, seed=0)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png").convert("RGB")), np.asarray(want))


def test_default_student_ships_with_its_record_and_follows_the_prompt(pipe):
    """`carrara generate --fast`: the distilled student beside the teacher (recipes/distill-default.toml, exported by
    `carrara export student --into-package`), made from these weights, checked against its run when exported."""
    index = json.loads((DEFAULT / "student" / "model_index.json").read_text())
    assert index["student"]["teacher_hash"] == pipe.model_hash and index["bits"] == 4
    assert index["check"]["mean_abs_dpixel_255"] <= 2.0 and index["check"]["prompts"] >= 8
    assert (DEFAULT / "student" / "training" / "loss.png").is_file()
    assert json.loads((DEFAULT / "student" / "training" / "config.json").read_text())["stage"] == "distill"
    fast = Pipeline.load("default", fast=True)
    assert fast.student == index["student"] and fast.sizes == (64, 128) and fast.model_hash == index["weights_hash"]
    prompts = ["red heart", "blue heart", "red circle", "blue circle"] * 4
    rgb = (fast(prompts, seed=0, output="tensor", size=64, **fast.defaults) + 1) / 2  # 4 steps, no CFG pair
    red_minus_blue = (rgb[:, 0] - rgb[:, 2]).mean((1, 2))
    red, blue = red_minus_blue[0::2], red_minus_blue[1::2]
    assert red.mean() - blue.mean() > 3 * ((red.var() + blue.var()) / 8).sqrt() and red.mean() > 0 > blue.mean()


def test_default_ships_int8_calibrations_for_the_model_its_upsampler_and_its_student():
    """`--precision int8` (models/int8.py) works out of the box for the model, its upsampler and, with --fast, its
    student: each calibration is of its own weights (`carrara quantize [--fast]`), and the int8 student's images stay
    near fp32's."""
    from carrara.models import int8

    teacher = Pipeline.load("default", precision="int8")
    up = json.loads((DEFAULT / "upsampler" / "unet" / int8.CALIBRATION_FILE).read_text())
    assert up["unet_hash"] == teacher.upsampler.weights_hash and int8.is_int8(teacher.upsampler.unet)
    for pipe, folder in ((teacher, DEFAULT / "unet"),
                         (Pipeline.load("default", precision="int8", fast=True), DEFAULT / "student" / "unet")):
        record = json.loads((folder / int8.CALIBRATION_FILE).read_text())
        assert record["unet_hash"] == pipe.model_hash and int8.is_int8(pipe.unet)
    assert pipe.student and record["settings"]["sampler"] == "lcm"
    fp32 = Pipeline.load("default", precision="fp32", fast=True)
    prompts = ["red heart", "a cat face", "pizza", "rocket"]
    a, b = (p(prompts, seed=0, output="tensor", size=64, **p.defaults) for p in (fp32, pipe))
    assert 0 < int8.pixel_diff_255(a, b) <= 3.0
