"""The unCLIP decoder and DALL-E 2 §3's manipulations: the decoder learns and listens to z_i (variations of a picture
are closer to it than to another in CLIP space), dropping z_i and the text is the unconditional pass, slerp keeps
its ends and the sphere, strips share their noise (a strip's ends are the pictures' variations, pixel for pixel), the
route text → prior → decoder loads from one folder, and bad input is one line."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_UNET
from PIL import Image

from carrara.cli import main
from carrara.diffusion.schedule import NoiseSchedule
from carrara.errors import CarraraError
from carrara.modelfolder import write_model_folder
from carrara.models.codec import PixelCodec, PixelCodecConfig
from carrara.models.config import UNetConfig
from carrara.models.unclip import ImageTokens, ImageTokensConfig
from carrara.models.unet import UNet2DConditionModel
from carrara.pipeline import Pipeline
from carrara.png import read_png_metadata
from carrara.train.core import TrainConfig
from carrara.train.decoder import DecoderRecipe, train_decoder
from carrara.train.prior import PriorRecipe, train_prior
from carrara.unclip import Unclip, assemble_unclip, slerp, text_diff

RED, BLUE = (220, 30, 30), (30, 30, 220)


def tiny_recipe(data, clip, model, steps=40, **kw):
    return DecoderRecipe(data=str(data), clip=str(clip), from_model=str(model), sample_images=2,
                         sample={"steps": 4, "sampler": "ddim", "guidance": 2.0},
                         train=TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=3, log_every=4,
                                           checkpoint_every=20, sample_every=1000, ema_decay=0.8, bf16=False), **kw)


def solid(path, colour, size=16):
    Image.new("RGB", (size, size), colour).save(path)
    return path


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Two solid-colour pictures under one caption: only z_i tells them apart."""
    root = tmp_path_factory.mktemp("colours")
    solid(root / "red.png", RED)
    solid(root / "blue.png", BLUE)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": "a square"}) + "\n"
                                                 for f in ("red.png", "blue.png")))
    return root


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory):
    """An untrained tiny pixel-space v-prediction model (16 px as 12 × 8 × 8): the tiny shapes VAE draws every solid
    colour nearly black, which would hide whether the decoder follows z_i."""
    root = tmp_path_factory.mktemp("pixels")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig(**TINY_UNET, in_channels=12, out_channels=12, sample_size=8,
                                           cross_attention_dim=384))
    schedule = NoiseSchedule.from_config("cosine", T=1000, prediction_type="v_prediction")
    write_model_folder(root, unet=unet, vae=PixelCodec(PixelCodecConfig(factor=2)),
                       scheduler_config=schedule.to_diffusers_config(), text_encoder="minilm")
    return root


@pytest.fixture(scope="module")
def decoder_run(colours, tiny_clip_run, pixel_model, tmp_path_factory):
    """A 40-step decoder on the two solid colours."""
    run = tmp_path_factory.mktemp("decoder")
    result = train_decoder(tiny_recipe(colours, tiny_clip_run[0], pixel_model, init_weights=False), run,
                           progress=False)
    return run, result


@pytest.fixture(scope="module")
def unclip_model(decoder_run, tiny_shapes, tiny_clip_run, tmp_path_factory):
    """The decoder run joined to a 12-step prior on the same CLIP."""
    prior = tmp_path_factory.mktemp("prior")
    train_prior(PriorRecipe(data=str(tiny_shapes), clip=str(tiny_clip_run[0]), holdout=8,
                            model={"width": 32, "layers": 1, "heads": 2, "mlp_ratio": 2},
                            sample={"steps": 4, "sampler": "ddim", "guidance": 2.0},
                            train=TrainConfig(steps=12, batch_size=16, lr=3e-3, warmup_steps=2, log_every=4,
                                              checkpoint_every=12, sample_every=1000, bf16=False)), prior,
                progress=False)
    out = tmp_path_factory.mktemp("unclip") / "model"
    assert main(["export", "unclip", "--decoder", str(decoder_run[0]), "--prior", str(prior), "--out", str(out)]) == 0
    return out, prior


def gen(model, *argv):
    return main(["generate", "--model", str(model), "--steps", "4", "--precision", "fp32", "--quiet", *argv])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("carrara: error: ") and "Traceback" not in err[0], err
    return err[0]


def test_the_decoder_loss_falls(tiny_shapes, tiny_clip_run, tiny_diffusion_run, tmp_path):
    run = tmp_path / "d"
    train_decoder(tiny_recipe(tiny_shapes, tiny_clip_run[0], tiny_diffusion_run, steps=36, init_weights=False), run,
                  progress=False)
    losses = [json.loads(s)["loss"] for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    assert (run / "loss.png").is_file() and list((run / "samples").glob("step_*.png"))
    assert (run / "decoder" / "unet" / "config.json").is_file() and (run / "decoder" / "image_tokens").is_dir()
    assert list((run / "cache").glob("prior-*.safetensors"))  # the prior stage's CLIP-embedding cache, shared


@pytest.mark.parametrize("config", ['[]', '"tokens"', '{"embed_dim": "8"}', '{"embed_dim": -3}',
                                    '{"num_tokens": 0}', '{"cross_attention_dim": 12.5}', '{"embed_dim": 1e12}'])
def test_a_damaged_image_token_config_is_one_error(config, tmp_path):
    ImageTokens(ImageTokensConfig(embed_dim=8, cross_attention_dim=12)).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(CarraraError, match="image tokens config"):
        ImageTokens.from_pretrained(tmp_path)
    with pytest.raises(CarraraError, match="num_tokens=-1"):  # also a recipe's image_tokens (train decoder)
        ImageTokensConfig(num_tokens=-1)


def test_the_conditioning_path_shapes_and_dtypes():
    tokens = ImageTokens(ImageTokensConfig(embed_dim=8, cross_attention_dim=12, num_tokens=4))
    states = torch.randn(3, 5, 12)
    z = F.normalize(torch.randn(3, 8), dim=-1)
    context, class_labels = tokens(states, z)
    assert context.shape == (3, 4 + 5, 12) and class_labels.shape == (3, 8)
    assert torch.equal(context[:, 4:], states)  # the text follows the K image tokens unchanged
    assert torch.allclose(class_labels, z * 8 ** 0.5)  # z_i scaled by √E, as the prior scales it
    half, _ = tokens(states.to(torch.bfloat16), z)
    assert half.dtype == torch.bfloat16 and context.dtype == torch.float32
    other, _ = tokens(states, F.normalize(torch.randn(3, 8), dim=-1))
    assert (other[:, :4] - context[:, :4]).abs().max() > 1e-3  # the tokens carry z_i


def test_dropping_the_image_and_the_text_is_the_unconditional_pass(decoder_run):
    """Guidance w = 0 is the unconditional model: the picture's z_i no longer matters; w = 1 it does, and the
    pipeline's null inputs are the training's dropped ones (z_i = 0, the empty prompt's states)."""
    pipe = Pipeline.load(decoder_run[0], precision="fp32")
    z = pipe.unclip.embed_pictures([Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)])  # (2, E)
    a = pipe(["", ""], image_embeds=z, guidance=0.0, steps=3, seed=1, same_noise=True, output="tensor")
    assert torch.equal(a[0], a[1])
    b = pipe(["", ""], image_embeds=z, guidance=1.0, steps=3, seed=1, same_noise=True, output="tensor")
    assert (b[0] - b[1]).abs().max() > 1e-2
    states, _ = pipe.text_encoder.encode([""])
    cond, uncond = pipe.unclip.conditions([""], states, states, z[:1])
    expected = pipe.unclip.image_tokens(states, torch.zeros(1, z.shape[1]))
    assert all(torch.equal(u, e) for u, e in zip(uncond, expected))
    assert torch.equal(uncond[1], torch.zeros_like(uncond[1])) and not torch.equal(cond[0], uncond[0])


def test_variations_stay_near_their_picture_in_clip_space(decoder_run, colours):
    """A decoder that ignored z_i would draw the same images for both pictures: it could not put each one's
    variations nearer to it than to the other."""
    run, result = decoder_run
    assert result["variations"]["cos_own"] > result["variations"]["cos_random"]
    pipe = Pipeline.load(run, precision="fp32")
    pictures = [Image.open(colours / "red.png"), Image.open(colours / "blue.png")]
    z = pipe.unclip.embed_pictures(pictures)  # (2, E)
    for k in range(2):
        images = pipe([""] * 4, image_embeds=z[k:k + 1].expand(4, -1), seed=5, steps=8, guidance=2.0,
                      output="tensor")
        with torch.inference_mode():
            cos = pipe.unclip.scorer.model.encode_image(images) @ z.T  # (4, 2)
        assert (cos[:, k] > cos[:, 1 - k]).all(), cos
    assert json.loads((run / "check.json").read_text())["variations"] == result["variations"]


def test_slerp_ends_and_midpoint():
    a, b = F.normalize(torch.randn(16), dim=0), F.normalize(torch.randn(16), dim=0)
    out = slerp(a, b, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(out[0], a, atol=1e-6) and torch.allclose(out[2], b, atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose((out[1] * a).sum(), (out[1] * b).sum(), atol=1e-6)  # the midpoint is equally far
    e1, e2 = torch.eye(2)
    assert torch.allclose(slerp(e1, e2, 0.5)[0], torch.tensor([1.0, 1.0]) / 2 ** 0.5, atol=1e-6)
    assert torch.allclose(slerp(e1, e1, torch.tensor([0.3]))[0], e1)  # parallel: no arc, no NaN
    z_i, new, old = F.normalize(torch.randn(3, 16), dim=-1)
    moved = text_diff(z_i, new, old, torch.tensor([0.0, 0.25, 0.5]))
    assert torch.allclose(moved[0], z_i, atol=1e-6)
    along = moved @ F.normalize(new - old, dim=0)
    assert along[0] < along[1] < along[2]  # each step moves toward the text direction
    with pytest.raises(CarraraError, match="same CLIP embedding"):
        text_diff(z_i, new, new, torch.tensor([0.5]))


def test_cli_variations_interpolation_and_text_diff(decoder_run, colours, tmp_path, capsys):
    run = decoder_run[0]
    red, blue = str(colours / "red.png"), str(colours / "blue.png")
    assert gen(run, "--variations", red, "--n", "2", "--seed", "3", "-o", str(tmp_path / "v.png")) == 0
    assert gen(run, "--variations", blue, "--n", "2", "--seed", "3", "-o", str(tmp_path / "w.png")) == 0
    assert gen(run, "--interpolate", red, blue, "--n", "3", "--seed", "3", "-o", str(tmp_path / "i.png")) == 0
    assert gen(run, "--variations", red, "--text-diff", "a blue square", "--n", "2", "--amount", "0.6",
               "--seed", "3", "-o", str(tmp_path / "t.png")) == 0
    v0, v1 = pixels(tmp_path / "v-0.png"), pixels(tmp_path / "v-1.png")
    assert np.abs(v0 - v1).max() > 0  # variations: new noise for each
    strip = [pixels(tmp_path / f"i-{k}.png") for k in range(3)]
    # one noise along the strip, and slerp's ends are the pictures' own embeddings: the strip's ends are the
    # first variation of each picture, pixel for pixel
    assert np.array_equal(strip[0], v0) and np.array_equal(strip[2], pixels(tmp_path / "w-0.png"))
    assert np.abs(strip[1] - strip[0]).max() > 0
    assert np.array_equal(pixels(tmp_path / "t-0.png"), v0)  # θ = 0 is the picture itself
    grid = Image.open(tmp_path / "i.png")
    assert grid.width > 2.5 * grid.height  # a strip: one row
    meta = read_png_metadata(tmp_path / "i-1.png")
    assert meta["unclip"]["mode"] == "interpolate" and meta["theta"] == 0.5 and meta["seed"] == 3
    assert [r["file"] for r in meta["unclip"]["images"]] == [str((colours / f).resolve()) for f in ("red.png",
                                                                                                     "blue.png")]
    meta = read_png_metadata(tmp_path / "t-1.png")
    assert meta["unclip"]["new_caption"] == "a blue square" and meta["unclip"]["amount"] == 0.6
    assert meta["theta"] == 0.6 and meta["prompt"] == ""
    assert read_png_metadata(tmp_path / "v-1.png")["seed"] == 4
    capsys.readouterr()
    assert gen(run, "--from", str(tmp_path / "v-1.png"), "-o", str(tmp_path / "f.png")) == 2  # not re-made: said so
    assert "does not re-make" in one_error_line(capsys)
    assert not (tmp_path / "f.png").exists()


def test_the_route_from_text_loads_from_one_folder(unclip_model, decoder_run, tmp_path, capsys):
    model, prior = unclip_model
    assert {p.name for p in model.iterdir()} >= {"decoder", "prior", "clip", "model_index.json"}
    pipe = Pipeline.load(model, precision="fp32")
    a = pipe(["a red circle"], steps=3, seed=2, output="tensor")
    again = pipe(["a red circle"], steps=3, seed=2, output="tensor")
    other = pipe(["a red circle"], steps=3, seed=2, prior_guidance=0.0, output="tensor")
    assert torch.equal(a, again) and (a - other).abs().max() > 1e-4  # the prior's own guidance scale matters
    z = pipe.unclip.sample_prior(["a red circle"], seed=2)
    assert torch.equal(pipe(["a red circle"], steps=3, seed=2, image_embeds=z, output="tensor"), a)
    assert gen(model, "a red circle", "--prior-guidance", "3", "-o", str(tmp_path / "p.png")) == 0
    assert read_png_metadata(tmp_path / "p.png")["prior"]["guidance"] == 3
    capsys.readouterr()
    assert gen(decoder_run[0], "a red circle", "-o", str(tmp_path / "q.png")) == 2  # a decoder alone has no prior
    assert "no prior/" in one_error_line(capsys)
    with pytest.raises(CarraraError, match="already exists"):
        assemble_unclip(decoder_run[0], prior, model)
    config = json.loads((model / "prior" / "config.json").read_text())
    (model / "prior" / "config.json").write_text(json.dumps({**config, "clip_fingerprint": "0" * 16}))
    with pytest.raises(CarraraError, match="different CLIPs"):
        assemble_unclip(decoder_run[0], model, tmp_path / "x")
    (model / "prior" / "config.json").write_text(json.dumps(config))
    assert isinstance(Unclip.load(model).prior.meta, dict)


def test_cli_errors_are_one_line(decoder_run, colours, tiny_diffusion_run, tmp_path, capsys):
    run, red = decoder_run[0], str(colours / "red.png")
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = str(tmp_path / "o.png")
    cases = [
        ((run, "--variations", str(tmp_path / "gone.png"), "-o", out), "no such file"),
        ((run, "--variations", str(corrupt), "-o", out), "--variations"),
        ((tiny_diffusion_run, "--variations", red, "-o", out), "not one"),
        ((run, "--interpolate", red, red, "--n", "1", "-o", out), "--n 2 or more"),
        ((run, "--text-diff", "a cat", "-o", out), "--variations IMAGE"),
        ((run, "--variations", red, "--amount", "0.3", "-o", out), "--text-diff"),
        ((run, "--variations", red, "--text-diff", "a cat", "--amount", "2", "-o", out), "between 0 and 1"),
        ((tiny_diffusion_run, "a red circle", "--prior-guidance", "2", "-o", out), "not an unCLIP model"),
    ]
    no_tokens, no_clip = tmp_path / "no-tokens", tmp_path / "no-clip"
    for broken in (no_tokens, no_clip):
        shutil.copytree(run / "decoder", broken / "decoder")
        shutil.copy2(run / "model_index.json", broken / "model_index.json")
    (no_tokens / "decoder" / "image_tokens" / "model.safetensors").write_bytes(b"not safetensors")
    index = json.loads((no_clip / "model_index.json").read_text())
    index["carrara"]["clip"] = str(tmp_path / "gone-clip")
    (no_clip / "model_index.json").write_text(json.dumps(index))
    cases += [((no_tokens, "--variations", red, "-o", out), "image tokens"),
              ((no_clip, "--variations", red, "-o", out), "gone-clip")]
    for argv, message in cases:
        assert gen(*argv) == 2, argv
        assert message in one_error_line(capsys), argv
    assert not list(tmp_path.glob("o*.png"))


def test_train_decoder_cli_resumes_and_needs_a_clip(colours, tiny_clip_run, tiny_diffusion_run, tmp_path, capsys):
    run = tmp_path / "d"
    args = ["train", "decoder", "--clip", str(tiny_clip_run[0]), "--data", str(colours), "--out", str(run),
            "--from", str(tiny_diffusion_run), "--quiet", "--set", "sample.steps=2", "--set", "sample_images=1",
            "--set", "train.batch_size=4", "--set", "train.checkpoint_every=2"]
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "3", "--resume"]) == 0
    assert "resumed from" in (run / "log.txt").read_text()
    assert "variations of data images" in capsys.readouterr().out
    assert main(["train", "decoder", "--data", str(colours), "--out", str(tmp_path / "q"), "--quiet"]) == 2
    assert "--clip" in one_error_line(capsys)


def test_quantize_calibrates_an_unclip_models_decoder(unclip_model, tmp_path, capsys):
    """The int8 calibration goes where Pipeline.load(…, precision="int8") reads it: the decoder's unet/."""
    model = tmp_path / "model"
    shutil.copytree(unclip_model[0], model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert main(["quantize", "--model", str(model), "--prompts", str(prompts), "--n", "1"]) == 0
    assert "mean |Δpixel| int8 vs fp32" in capsys.readouterr().out
    assert (model / "decoder" / "unet" / "int8_calibration.json").is_file()
    assert Pipeline.load(model, precision="int8").precision == "int8"
