"""The pipeline and `carrara generate` on a tiny random model folder: determinism, metadata, errors; and a tiny
trained model whose images follow its prompt."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import TINY_UNET as TINY_UNET_DICT
from conftest import tiny_diffusion_recipe
from PIL import Image

from carrara.cli import main
from carrara.diffusion.guidance import cfg_model
from carrara.diffusion.samplers import default_timesteps, sample_ddim
from carrara.diffusion.schedule import NoiseSchedule
from carrara.errors import CarraraError
from carrara.hardware import cpu_supports_bf16
from carrara.modelfolder import write_model_folder
from carrara.models.autoencoder import AutoencoderKL
from carrara.models.config import AutoencoderConfig, UNetConfig
from carrara.models.unet import UNet2DConditionModel
from carrara.pipeline import Pipeline
from carrara.png import read_png_metadata
from carrara.train.diffusion import train_diffusion

TINY_UNET = UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                       cross_attention_dim=384, attention_head_dim=(2, 4),
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                             sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.7)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(TINY_UNET)
    with torch.no_grad():  # diffusers zero-initialises conv_out; random weights make outputs depend on the text
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae = AutoencoderKL(TINY_VAE)
    schedule = NoiseSchedule.from_config("scaled_linear", T=1000)
    write_model_folder(root, unet=unet, vae=vae, scheduler_config=schedule.to_diffusers_config(), text_encoder="minilm")
    return root


@pytest.fixture(scope="module")
def pipe(model_dir):
    return Pipeline.load(model_dir, precision="fp32")  # the algorithms' tests; bf16 has its own below


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_is_deterministic_and_seed_dependent(pipe):
    a = pipe(["a red circle"], steps=4, seed=3, output="tensor")
    b = pipe(["a red circle"], steps=4, seed=3, output="tensor")
    c = pipe(["a red circle"], steps=4, seed=4, output="tensor")
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    assert a.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("precision, sampler", [("fp32", "dpmpp"), ("bf16", "dpmpp"), ("fp32", "ddpm"),
                                                ("fp32", "euler_a")])
def test_image_i_of_a_batch_is_seed_plus_i(model_dir, precision, sampler):
    """Also for the samplers that draw noise at every step: image i's whole stream is seeded seed + i."""
    pipe = Pipeline.load(model_dir, precision=precision)
    batch = pipe(["a red circle", "a blue square"], steps=4, seed=10, output="tensor", sampler=sampler)
    alone = pipe(["a blue square"], steps=4, seed=11, output="tensor", sampler=sampler)
    assert (batch[1] - alone[0]).abs().max() < 1e-4
    if sampler != "dpmpp":  # the step noise is not x_T drawn again: another seed's stream gives another image
        assert (pipe(["a blue square"], steps=4, seed=12, output="tensor", sampler=sampler) - alone).abs().max() > 1e-2


def test_text_and_guidance_change_the_image(pipe):
    """w = 0 samples the negative prompt's model and w = 1 the prompt's; after one DDIM step (x̂0 = (x_T − √(1 − ᾱ) ε̃)
    / √ᾱ, linear in ε̃ = ε(∅) + w (ε(c) − ε(∅))) the latent is linear in w. Any step that drops the text, swaps the
    two branches or ignores w breaks one of these."""
    def latent(prompt, w, negative="", steps=4):
        return pipe([prompt], steps=steps, sampler="ddim", guidance=w, negative_prompt=negative, seed=0,
                    output="latent")  # (1, 4, 8, 8)

    red, blue = latent("a red circle", 1.0), latent("a blue truck", 1.0)
    # rounding (batch of 2 vs 1) is ~1e-6 of |z|; the text moves this random model's latent by ~10 % of |z|
    assert (red - blue).abs().mean() > 0.05 * red.abs().mean()
    assert torch.allclose(latent("a red circle", 0.0), latent("a blue truck", 0.0), atol=1e-5)  # w = 0: ε(∅) only
    assert torch.allclose(latent("a red circle", 0.0, negative="a blue truck"), blue, rtol=1e-4, atol=1e-4)
    z0, z1, z8 = (latent("a red circle", w, steps=1) for w in (0.0, 1.0, 8.0))
    assert (z1 - z0).abs().mean() > 1e-3 * z1.abs().mean()  # measured 4e-3: 7 (z1 − z0) is far above the tolerance
    assert torch.allclose(z8, z0 + 8 * (z1 - z0), rtol=1e-4, atol=1e-4)


def test_carrara_bf16_switch_decides_auto_precision(model_dir, monkeypatch):
    """CARRARA_BF16=0 gives the fp32 path on any CPU (`make test-avx2`), =1 the bf16 one; anything else is an error."""
    monkeypatch.setenv("CARRARA_BF16", "0")
    assert Pipeline.load(model_dir).precision == "fp32" and not cpu_supports_bf16()
    monkeypatch.setenv("CARRARA_BF16", "1")
    assert Pipeline.load(model_dir).precision == "bf16" and cpu_supports_bf16()
    monkeypatch.setenv("CARRARA_BF16", "yes")
    with pytest.raises(CarraraError, match="CARRARA_BF16='yes': set it to 0"):
        Pipeline.load(model_dir)


def test_guidance_one_equals_the_conditional_model(pipe):
    """CFG with w = 1 is the conditional prediction: compare with a sampler run on the bare U-Net."""
    got = pipe(["a red circle"], steps=5, sampler="ddim", guidance=1.0, seed=2, output="tensor")
    cond, _ = pipe.text_encoder.encode(["a red circle"])
    x_T = torch.randn(1, *pipe.latent_shape(), generator=torch.Generator().manual_seed(2))
    ts = default_timesteps("ddim", pipe.schedule, 5)
    with torch.inference_mode():
        z0 = sample_ddim(lambda x, t: pipe.unet(x, t, cond), x_T, pipe.schedule, ts)
        want = pipe.decode(z0)
        guided = cfg_model(lambda x, t, s: pipe.unet(x, t, s), cond, pipe.text_encoder.null_states(1), 1.0)
        assert torch.equal(guided(x_T, ts[0]), pipe.unet(x_T, ts[0], cond))
    assert (got - want).abs().max() < 1e-5


def test_cli_same_seed_same_pixels_and_metadata_round_trip(model_dir, tmp_path, capsys):
    args = ["generate", "a small red circle", "--model", str(model_dir), "--steps", "3", "--seed", "7",
            "--guidance", "3.5", "--negative", "blue", "--sampler", "ddim"]
    assert main(args + ["-o", str(tmp_path / "a.png")]) == 0
    assert main(args + ["-o", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    meta = read_png_metadata(tmp_path / "a.png")
    assert meta["prompt"] == "a small red circle" and meta["seed"] == 7 and meta["steps"] == 3
    assert meta["sampler"] == "ddim" and meta["guidance"] == 3.5 and meta["negative_prompt"] == "blue"
    assert len(meta["model_hash"]) == 12
    assert main(["generate", "--from", str(tmp_path / "a.png"), "-o", str(tmp_path / "c.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))
    assert main(["generate", "--from", str(tmp_path / "a.png"), "--seed", "8", "-o", str(tmp_path / "d.png")]) == 0
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "d.png"))
    # the precision is part of the recipe: --from re-creates an fp32 image in fp32 on any machine
    assert meta["precision"] == Pipeline.load(model_dir).precision
    assert main(args + ["--precision", "fp32", "-o", str(tmp_path / "e.png")]) == 0
    assert read_png_metadata(tmp_path / "e.png")["precision"] == "fp32"
    assert main(["generate", "--from", str(tmp_path / "e.png"), "-o", str(tmp_path / "f.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "e.png"), pixels(tmp_path / "f.png"))


def test_bf16_weights_stay_close_to_fp32(model_dir):
    """precision="bf16" (the default on CPUs with native bf16) runs the U-Net in bf16 weights; the sampler, the
    guidance sum and the decoder stay fp32. Tolerance: mean |Δpixel| ≤ 2/255 after 8 steps at guidance 4."""
    fp32, bf16 = Pipeline.load(model_dir, precision="fp32"), Pipeline.load(model_dir, precision="bf16")
    assert next(bf16.unet.parameters()).dtype == torch.bfloat16 and bf16.precision == "bf16"
    assert next(fp32.unet.parameters()).dtype == torch.float32
    prompts = ["a red circle", "a small blue square on the right"]
    a = fp32(prompts, steps=8, seed=5, output="tensor")  # (2, 3, 16, 16) in [-1, 1]
    b = bf16(prompts, steps=8, seed=5, output="tensor")
    diff = (a - b).abs() * 127.5  # in 1/255 units
    assert b.dtype == torch.float32
    assert 0 < diff.mean() <= 2.0, diff.mean()
    with pytest.raises(CarraraError, match="unknown precision 'fp8'"):
        Pipeline.load(model_dir, precision="fp8")


def test_cli_grid_for_n_images(model_dir, tmp_path):
    assert main(["generate", "x", "--model", str(model_dir), "--steps", "2", "--n", "4", "-o", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_bad_model_path_is_one_line(tmp_path, capsys):
    rc = main(["generate", "a cat", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")])
    assert rc == 2 and "does not exist" in one_error_line(capsys)
    assert not (tmp_path / "x.png").exists()


def test_corrupt_checkpoint_is_one_line(model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["generate", "a cat", "--model", str(broken), "-o", str(tmp_path / "x.png")]) == 2
    one_error_line(capsys)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "-2"], ["--guidance", "-1"], ["--n", "0"]])
def test_bad_numbers_are_one_line(model_dir, tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(["generate", "a cat", "--model", str(model_dir), "-o", str(tmp_path / "x.png"), *argv])
    assert e.value.code == 2
    one_error_line(capsys)


def test_empty_prompt_and_bad_output_are_one_line(model_dir, tmp_path, capsys):
    assert main(["generate", "  ", "--model", str(model_dir)]) == 2
    assert "prompt" in one_error_line(capsys)
    assert main(["generate", "a cat", "--model", str(model_dir), "-o", str(tmp_path / "x.jpg")]) == 2
    assert ".png" in one_error_line(capsys)
    assert main(["generate", "--from", str(tmp_path / "none.png")]) == 2
    one_error_line(capsys)


def test_model_folder_round_trips_components(model_dir, pipe):
    assert dataclasses.asdict(pipe.unet.config) == dataclasses.asdict(TINY_UNET)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.7)
    assert pipe.schedule.kind.value == "scaled_linear"


@pytest.fixture(scope="module")
def two_caption_run(tiny_ae_run, tmp_path_factory):
    """150 steps of a small U-Net on 32 flat 16×16 images: 16 reddish "a red circle", 16 bluish "a blue square"."""
    data = tmp_path_factory.mktemp("two_captions")
    rng, lines = np.random.default_rng(0), []
    for i in range(32):
        text, rgb = ("a red circle", (200, 40, 40)) if i % 2 == 0 else ("a blue square", (40, 40, 200))
        color = np.clip(np.array(rgb) + rng.normal(0, 15, 3), 0, 255).astype(np.uint8)  # a shade per image
        Image.fromarray(np.tile(color, (16, 16, 1))).save(data / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    recipe = tiny_diffusion_recipe(data, tiny_ae_run, steps=150)
    recipe.model = {**TINY_UNET_DICT, "block_out_channels": [16, 32]}
    recipe.train = dataclasses.replace(recipe.train, batch_size=16, lr=5e-3, warmup_steps=10, checkpoint_every=150)
    run = tmp_path_factory.mktemp("two_caption_run")
    train_diffusion(recipe, run, progress=False)
    return data, run


def test_a_trained_model_follows_its_prompt(two_caption_run):
    """Every "red" latent (8 seeds) lies nearer the red images' mean latent than the blue ones', and vice versa.

    A model trained without its captions (every caption replaced by "", as a broken batch would) samples the
    two-colour mixture whatever the prompt: most seeds land on the same side for both prompts, and this fails.
    Measured on an AVX2 CPU, in units of |z̄_red − z̄_blue|²: margins 0.96–3.0; trained without captions −1.1–1.3.
    """
    data, run = two_caption_run
    pipe = Pipeline.load(run, precision="fp32")
    images = torch.stack([torch.from_numpy(pixels(data / f"{i}.png")) for i in range(32)]).permute(0, 3, 1, 2)
    with torch.inference_mode():
        z = pipe.vae.encode(images.float() / 127.5 - 1).mean * pipe.vae.config.scaling_factor  # (32, 4, 8, 8)
    red_mean, blue_mean = z[0::2].mean(0), z[1::2].mean(0)
    gap = ((red_mean - blue_mean) ** 2).mean()

    def nearer_red(latents):  # (8,): how much nearer each latent is to the red mean than to the blue one
        return ((latents - blue_mean) ** 2).mean((1, 2, 3)) - ((latents - red_mean) ** 2).mean((1, 2, 3))

    red = pipe(["a red circle"] * 8, steps=10, guidance=4.0, seed=0, output="latent")  # seeds 0…7
    blue = pipe(["a blue square"] * 8, steps=10, guidance=4.0, seed=0, output="latent")  # the same seeds
    assert (nearer_red(red) > 0.1 * gap).all() and (-nearer_red(blue) > 0.1 * gap).all(), \
        (nearer_red(red) / gap, -nearer_red(blue) / gap)
