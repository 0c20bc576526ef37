"""img2img (SDEdit) and inpainting (RePaint's blending): diffusion/editing.py, the samplers' after_step, Pipeline."""
import numpy as np
import pytest
import torch
from PIL import Image

from carrara.diffusion.editing import blend_known, latent_mask, noise_to, truncate_plan
from carrara.diffusion.samplers import SAMPLERS, alpha_bar_at, default_timesteps
from carrara.diffusion.schedule import NoiseSchedule
from carrara.errors import CarraraError
from carrara.images import from_pil, square
from carrara.pipeline import Pipeline

SAMPLER_NAMES = list(SAMPLERS)


def test_truncate_plan_runs_the_last_int_steps_times_strength_as_diffusers():
    plan = list(range(19, -1, -1))  # 20 descending timesteps
    assert truncate_plan(plan, 1.0) == plan
    assert truncate_plan(plan, 0.6) == plan[8:]  # int(12.0) = 12 steps: the last 12
    assert truncate_plan(plan, 0.59) == plan[9:]  # int(11.8) = 11
    assert truncate_plan(plan, 0.04) == []  # int(0.8) = 0: nothing to run
    for bad in (0, -0.5, 1.01, float("nan"), "0.5", True):
        with pytest.raises(CarraraError, match="strength"):
            truncate_plan(plan, bad)


def test_latent_mask_regenerates_a_cell_if_any_of_its_pixels_is_masked():
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 3, 4] = 1.0  # one pixel, in latent cell (1, 2) of a factor-2 grid
    cells = latent_mask(mask, 2)
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 1, 2] = 1.0
    assert torch.equal(cells, expected)
    with pytest.raises(CarraraError, match="multiple"):
        latent_mask(torch.zeros(1, 1, 9, 9), 2)


def _toy_model(x, t):
    """A fixed smooth function of (x, t), standing in for a network (ε-prediction)."""
    return 0.3 * torch.tanh(x) + 1e-4 * t.float().view(-1, 1, 1, 1)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_an_identity_after_step_changes_nothing_and_is_told_every_steps_noise_level(sampler):
    schedule = NoiseSchedule.from_config("scaled_linear", 1000)
    ts = default_timesteps(sampler, schedule, 6)
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    plain = SAMPLERS[sampler](_toy_model, x_T, schedule, ts, generator=torch.Generator().manual_seed(1))
    seen = []

    def identity(i, abar, x):
        seen.append((i, abar))
        return x

    hooked = SAMPLERS[sampler](_toy_model, x_T, schedule, ts, generator=torch.Generator().manual_seed(1),
                               after_step=identity)
    torch.testing.assert_close(hooked, plain, rtol=1e-6, atol=1e-6)
    assert [i for i, _ in seen] == list(range(len(ts)))
    assert seen[-1][1] == 1.0  # clean data after the last step
    # the levels are the next timesteps' ᾱ as the sampler reads them (σ-space: from its interpolated σ)
    expected = [alpha_bar_at(sampler, schedule, t) for t in ts[1:]]
    np.testing.assert_allclose([a for _, a in seen[:-1]], expected, rtol=1e-9)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_blending_keeps_the_known_region_exactly_and_lets_the_rest_be_sampled(sampler):
    schedule = NoiseSchedule.from_config("scaled_linear", 1000)
    ts = default_timesteps(sampler, schedule, 6)
    gen = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(1, 4, 4, 4, generator=gen), torch.randn(1, 4, 4, 4, generator=gen)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :, 2:] = 1.0  # regenerate the right half
    out = SAMPLERS[sampler](_toy_model, eps, schedule, ts, generator=torch.Generator().manual_seed(1),
                            after_step=blend_known(z0, eps, mask))
    torch.testing.assert_close(out[..., :2], z0[..., :2], rtol=0, atol=1e-6)  # ᾱ = 1 at the end: z0 itself
    assert (out[..., 2:] - z0[..., 2:]).abs().mean() > 0.1  # the masked half is the sampler's own


def test_noise_to_is_q_xt_given_x0():
    z0, eps = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0)
    assert noise_to(z0, eps, 0.64).item() == pytest.approx(0.8 * 2.0 - 0.6)


def test_square_centre_crops_composites_alpha_on_white_and_keeps_masks_binary():
    im = Image.new("RGBA", (30, 20), (255, 0, 0, 0))  # transparent
    im.paste((0, 0, 255, 255), (5, 0, 25, 20))  # an opaque blue block in the centre 20 × 20
    out = square(im, 10)
    assert out.size == (10, 10) and out.mode == "RGB"
    assert out.getpixel((5, 5)) == (0, 0, 255)  # the centre crop is the blue block
    corner = square(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), 8).getpixel((0, 0))
    assert corner == (255, 255, 255)  # transparency over white
    mask = Image.new("L", (8, 8), 0)
    mask.paste(200, (0, 0, 4, 8))
    m = from_pil([mask], 4, mask=True)
    assert m.shape == (1, 1, 4, 4) and set(m.unique().tolist()) == {0.0, 1.0}
    assert m[0, 0, :, :2].eq(1).all() and m[0, 0, :, 2:].eq(0).all()


@pytest.fixture(scope="module")
def pipe(tiny_diffusion_run):
    return Pipeline.load(tiny_diffusion_run, precision="fp32")


@pytest.fixture(scope="module")
def init_image(pipe):
    side = pipe.sizes[0]
    im = Image.new("RGB", (side, side), (240, 240, 240))
    im.paste((200, 30, 30), (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    return im


def test_img2img_at_strength_one_is_txt2img_from_the_same_seed(pipe, init_image):
    kw = {"steps": 5, "sampler": "dpmpp", "guidance": 3.0, "seed": 4, "output": "tensor"}
    txt = pipe(["a red square"], **kw)
    img = pipe(["a red square"], init_image=init_image, strength=1.0, **kw)
    assert torch.equal(img, txt)


def test_img2img_with_no_step_to_run_returns_the_autoencoders_reconstruction(pipe, init_image):
    init = from_pil([init_image], pipe.sizes[0])
    recon = pipe.decode(pipe.vae.encode(init).mode() * pipe.vae.config.scaling_factor)
    out = pipe(["a red square"], init_image=init_image, strength=0.01, steps=20, output="tensor")
    torch.testing.assert_close(out, recon, rtol=0, atol=1e-5)  # the init within the autoencoder's error


def test_img2img_moves_further_from_the_init_as_strength_grows_and_is_one_image_per_seed(pipe, init_image):
    z_init = pipe.vae.encode(from_pil([init_image], pipe.sizes[0])).mode() * pipe.vae.config.scaling_factor
    kw = {"steps": 10, "sampler": "ddim", "guidance": 3.0, "output": "latent", "init_image": init_image}
    dist = [(pipe(["a blue circle"], strength=s, seed=1, **kw) - z_init).abs().mean().item() for s in (0.2, 0.5, 1.0)]
    assert dist[0] < dist[1] < dist[2], dist
    batch = pipe(["a blue circle", "a blue circle"], strength=0.5, seed=1, **kw)
    alone = pipe(["a blue circle"], strength=0.5, seed=2, **kw)
    torch.testing.assert_close(batch[1:], alone, rtol=0, atol=1e-5)  # image i of a batch = seed + i alone


def _half_mask(side):
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (side // 2, 0, side, side))  # regenerate the right half (aligned to latent cells)
    return mask


@pytest.mark.parametrize("sampler", ["dpmpp", "euler_a"])
def test_inpainting_keeps_the_unmasked_region(pipe, init_image, sampler):
    side = pipe.sizes[0]
    kw = {"steps": 8, "sampler": sampler, "guidance": 3.0, "seed": 3, "init_image": init_image,
          "mask": _half_mask(side)}
    init = from_pil([init_image], side)
    z_init = pipe.vae.encode(init).mode() * pipe.vae.config.scaling_factor
    latent = pipe(["a green star"], output="latent", **kw)
    half = latent.shape[-1] // 2
    torch.testing.assert_close(latent[..., :half], z_init[..., :half], rtol=0, atol=1e-5)  # kept cells: z0 exactly
    assert (latent[..., half:] - z_init[..., half:]).abs().mean() > 0.05  # the masked cells are new
    out = pipe(["a green star"], output="tensor", **kw)
    assert torch.equal(out[..., : side // 2], init[..., : side // 2])  # the kept pixels are the init's own
    torch.testing.assert_close(out[..., side // 2:], pipe.decode(latent)[..., side // 2:], rtol=0, atol=1e-5)


def test_img2img_and_inpainting_equal_diffusers_pipelines_on_the_exported_model(tiny_diffusion_run, tmp_path, pipe,
                                                                                  init_image, monkeypatch):
    """DDIM η = 0: carrara's latents = diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline
    (4-channel U-Net: the same blending) given the same image latent and noise generators."""
    diffusers = pytest.importorskip("diffusers")
    from carrara.cli import main
    from carrara.diffusion.samplers import SchedulerOptions

    # diffusers' Stable Diffusion pipelines rewrite a scheduler config's steps_offset to 1 ("outdated" otherwise)
    monkeypatch.setattr(pipe, "scheduler_options", SchedulerOptions(steps_offset=1))

    out = tmp_path / "sd"
    assert main(["export", "diffusers", "--model", str(tiny_diffusion_run), "--out", str(out)]) == 0
    side = pipe.sizes[0]
    prompts, steps, guidance, seed, strength = ["a red circle", "a small blue square"], 10, 3.0, 5, 0.6
    z_init = pipe.vae.encode(from_pil([init_image], side)).mode() * pipe.vae.config.scaling_factor  # (1, c, h, w)
    gens = lambda: [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    ours = pipe(prompts, steps=steps, sampler="ddim", guidance=guidance, seed=seed, init_image=init_image,
                strength=strength, output="latent")
    i2i = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(str(out), local_files_only=True)
    theirs = i2i(prompts, image=z_init.repeat(2, 1, 1, 1), strength=strength, num_inference_steps=steps,
                 guidance_scale=guidance, eta=0.0, generator=gens(), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-4)
    mask = _half_mask(side)
    ours = pipe(prompts, steps=steps, sampler="ddim", guidance=guidance, seed=seed, init_image=init_image,
                strength=strength, mask=mask, output="latent")
    inp = diffusers.StableDiffusionInpaintPipeline.from_pretrained(str(out), local_files_only=True)
    theirs = inp(prompts, image=z_init.repeat(2, 1, 1, 1), mask_image=mask, masked_image_latents=z_init.repeat(
                 2, 1, 1, 1), strength=strength, height=side,
                 width=side, num_inference_steps=steps, guidance_scale=guidance, eta=0.0, generator=gens(),
                 output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-4)


def test_editing_refuses_bad_inputs_in_one_line(pipe, init_image):
    with pytest.raises(CarraraError, match="needs an init image"):
        pipe(["x"], mask=_half_mask(pipe.sizes[0]), steps=2)
    with pytest.raises(CarraraError, match="strength"):
        pipe(["x"], init_image=init_image, strength=0.0, steps=2)
    with pytest.raises(CarraraError, match="one per prompt"):
        pipe(["x", "y", "z"], init_image=[init_image, init_image], steps=2)
    with pytest.raises(CarraraError, match=r"\(B, 3, H, W\)"):
        pipe(["x"], init_image=torch.zeros(1, 4, 8, 8), steps=2)
