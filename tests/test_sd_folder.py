"""A diffusers Stable Diffusion folder loads into carrara's Pipeline, offline, and gives diffusers' image."""
import json
import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from carrara.diffusion.samplers import SchedulerOptions, sampling_plan
from carrara.errors import CarraraError
from carrara.pipeline import Pipeline

WORDS = ["red", "blue", "circle", "square", "green", "blurry"]  # whole-word BPE tokens; other text spells out
PROMPTS = ["a red circle", "a blue square"]
NEGATIVE = "green blurry"
STEPS, GUIDANCE, SEED = 5, 5.0, 3
# Stable Diffusion 1.x/2.x scheduler_config.json: DDIM on the "leading" grid t = 1, 1 + k, … (steps_offset = 1)
# whose last step ends at ᾱ_0, not at clean data (set_alpha_to_one = False).
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
                "set_alpha_to_one": False, "clip_sample": False}


def clip_tokenizer(folder):
    """A CLIP BPE tokenizer written from a small vocab.json + merges.txt (nothing downloaded)."""
    from transformers import AutoTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.update({c: len(vocab), c + "</w>": len(vocab) + 1})
    merges = []
    for word in WORDS:  # merge left to right: r e → re, re d</w> → red</w>, …
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append((symbols[0], symbols[1]))
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            vocab.setdefault(symbols[0], len(vocab))
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in dict.fromkeys(merges)))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}))
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(folder, diffusers pipeline): a tiny random StableDiffusionPipeline saved with `save_pretrained`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tmp = tmp_path_factory.mktemp("sd")
    tokenizer = clip_tokenizer(tmp / "tokenizer_src")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=(2, 4), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    with torch.no_grad():  # diffusers zero-initialises some layers (conv_out, proj_out): perturb every weight
        for module in (text_encoder, unet, vae):
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp / "sd-tiny"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe


@pytest.fixture(scope="module")
def reference(sd):
    """diffusers' latents and images (B, 3, H, W) in [0, 1], started from carrara's x_T (seed + i per image)."""
    _, ref = sd
    x_T = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(SEED + i))
                     for i in range(len(PROMPTS))])  # (2, 4, 8, 8), as Pipeline.__call__ draws it
    kwargs = {"negative_prompt": [NEGATIVE] * len(PROMPTS), "num_inference_steps": STEPS,
              "guidance_scale": GUIDANCE, "eta": 0.0, "latents": x_T, "height": 16, "width": 16}
    with torch.no_grad():
        latents = ref(PROMPTS, output_type="latent", **kwargs).images  # (2, 4, 8, 8)
        images = ref(PROMPTS, output_type="pt", **kwargs).images  # (2, 3, 16, 16)
    return latents, images


def generate(pipe, output):
    return pipe(PROMPTS, steps=STEPS, sampler="ddim", guidance=GUIDANCE, negative_prompt=NEGATIVE, seed=SEED,
                output=output)


def test_sd_folder_matches_diffusers_ddim(sd, reference):
    folder, ref = sd
    want_latents, want_images = reference
    pipe = Pipeline.load(folder, precision="fp32")  # diffusers runs fp32
    assert pipe.scheduler_options == SchedulerOptions(steps_offset=1, set_alpha_to_one=False)
    ref.scheduler.set_timesteps(STEPS)
    timesteps, options = sampling_plan("ddim", pipe.schedule, STEPS, pipe.scheduler_options)
    assert timesteps == ref.scheduler.timesteps.tolist() == [801, 601, 401, 201, 1]
    assert options == {"final_alpha_bar": float(pipe.schedule.alphas_cumprod[0])}
    latents = generate(pipe, "latent")  # (2, 4, 8, 8)
    images = (generate(pipe, "tensor") + 1) / 2  # (2, 3, 16, 16) in [0, 1]
    latent_diff = (latents - want_latents).abs().max().item()
    pixel_diff = (images - want_images).abs().max().item()
    print(f"\nmax |carrara − diffusers|: latents {latent_diff:.1e} (std {want_latents.std():.1f}), "
          f"pixels {pixel_diff:.1e} = {pixel_diff * 255:.1e}/255")
    assert latent_diff <= 1e-4
    assert pixel_diff <= 1 / 255
    assert (want_images[0] - want_images[1]).abs().max() > 0.1  # the images depend on prompt and seed


@pytest.mark.parametrize("settings", [SchedulerOptions(), SchedulerOptions(steps_offset=1),
                                      SchedulerOptions(set_alpha_to_one=False)])
def test_each_scheduler_setting_is_needed(sd, reference, settings):
    """carrara's own DDIM grid (t = 0, k, …) or end point (ᾱ = 1) would miss diffusers' latents by far."""
    pipe = Pipeline.load(sd[0], precision="fp32")
    pipe.scheduler_options = settings
    assert (generate(pipe, "latent") - reference[0]).abs().max() > 0.01


def one_line_error(folder) -> str:
    with pytest.raises(CarraraError) as info:
        Pipeline.load(folder)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_missing_unet_is_one_line_error(sd, tmp_path):
    folder = shutil.copytree(sd[0], tmp_path / "no-unet")
    shutil.rmtree(folder / "unet")
    assert "unet" in one_line_error(folder)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"carrara": "x"}', '{"carrara": {"text_encoder": 5}}'])
def test_bad_model_index_is_one_line_error(sd, tmp_path, text):
    folder = shutil.copytree(sd[0], tmp_path / "bad-index")
    (folder / "model_index.json").write_text(text)
    assert "model_index.json" in one_line_error(folder)
