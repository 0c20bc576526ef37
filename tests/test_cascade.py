"""The cascade: the upsampler stage's network, its training step, and the pipeline that chains base → upsampler."""
import json
import shutil

import pytest
import torch
from conftest import TINY_UNET
from reference import reference_pair

from carrara.cli import main
from carrara.diffusion.schedule import NoiseSchedule
from carrara.errors import CarraraError
from carrara.models import UNet2DConditionModel, UNetConfig
from carrara.pipeline import Pipeline
from carrara.train.core import TrainConfig
from carrara.train.upsampler import UpsamplerRecipe, random_crops, train_upsampler
from carrara.upsampler import (
    Upsampler,
    UpsamplerSettings,
    bicubic_reference,
    depth_to_space,
    downsample,
    residual_std,
    space_to_depth,
)

LEVELED = {**TINY_UNET, "sample_size": 8, "cross_attention_dim": 16, "class_embed_type": "timestep",
           "in_channels": 15, "out_channels": 12}


def test_noise_level_embedding_matches_diffusers():
    """class_embed_type="timestep" (the augmentation level s, embedded like t) equals diffusers' U-Net."""
    diffusers = pytest.importorskip("diffusers")
    theirs, ours = reference_pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, UNetConfig, LEVELED)
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 15, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    t, level = torch.tensor([3, 917]), torch.tensor([0, 250])
    with torch.no_grad():
        ref = theirs(x, t, text, class_labels=level).sample
        assert (ours(x, t, text, class_labels=level) - ref).abs().max() <= 1e-4
        assert (ours(x, t, text, class_labels=level.flip(0)) - ref).abs().max() > 1e-2  # the level is used


def test_space_to_depth_is_lossless_and_crops_commute_with_downsampling():
    x = torch.randn(3, 3, 12, 12)
    assert space_to_depth(x, 2).shape == (3, 12, 6, 6)
    assert torch.equal(depth_to_space(space_to_depth(x, 2), 2), x)
    full = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    crops, none = random_crops(full, 8, 2, torch.Generator().manual_seed(0))  # (2, 3, 8, 8)
    assert crops.shape == (2, 3, 8, 8) and none is None
    low = downsample(full, 2)
    for c, lo in zip(crops, low):  # each crop's low-resolution image is a window of the whole low-resolution image
        windows = lo.unfold(1, 4, 1).unfold(2, 4, 1)  # (3, 5, 5, 4, 4)
        match = (windows - downsample(c[None], 2)[0][:, None, None]).abs().amax((0, 3, 4)) == 0
        assert match.any()
    # given the small images, the same window of them: for the downsampled images, exactly the crop's own
    same, small = random_crops(full, 8, 2, torch.Generator().manual_seed(0), low)
    assert torch.equal(same, crops) and torch.equal(small, downsample(crops, 2))


def test_degraded_training_conditions_on_the_autoencoder_round_trip_from_its_step(tiny_shapes, tiny_ae_run, tmp_path,
                                                                                  monkeypatch):
    """With degrade = autoencoder:RUN, steps before degrade_from see the box-downsampled crop and steps after see
    the same window of the autoencoder's round trip of the whole small image; the residual is over its bicubic."""
    import carrara.train.upsampler as tu
    from carrara.models.codec import load_codec

    seen = []
    real_target = tu.residual_target

    def spy(high, lowres, f, k):
        seen.append((high.clone(), lowres.clone()))
        return real_target(high, lowres, f, k)

    monkeypatch.setattr(tu, "residual_target", spy)
    recipe = UpsamplerRecipe(data=str(tiny_shapes), size=32, factor=2, crop=16, degrade=f"autoencoder:{tiny_ae_run}",
                             degrade_from=2, model={**TINY_UNET, "class_embed_type": "timestep"},
                             sampling=UpsamplerSettings(steps=2),
                             train=TrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, log_every=2,
                                               checkpoint_every=4, sample_every=4, bf16=False))
    train_upsampler(recipe, tmp_path / "run", progress=False)
    assert Upsampler.load(tmp_path / "run").degrade == "autoencoder"
    codec = load_codec(tiny_ae_run / "vae")
    for step, (high, lowres) in enumerate(seen[:4]):
        clean = downsample(high, 2)
        if step < 2:
            assert torch.equal(lowres, clean)
        else:  # a window of D(E(whole small image)): near the clean crop, not equal, and not the crop's own round trip
            assert 0 < (lowres - clean).abs().mean() < 0.5
            with torch.no_grad():
                own = codec.decode(codec.encode(clean).mode()).clamp(-1, 1)
            inside = (lowres - own)[..., 2:-2, 2:-2].abs().max()  # away from the crop's edges they agree closely
            assert inside < (lowres - clean).abs().max()


def test_upsampler_recipe_refuses_a_bad_degradation():
    from carrara.train.upsampler import check_recipe

    for bad in ("blur", "autoencoder", "autoencoder:"):
        with pytest.raises(CarraraError, match="degrade must be"):
            check_recipe(UpsamplerRecipe(degrade=bad))
    with pytest.raises(CarraraError, match="degrade_from"):
        check_recipe(UpsamplerRecipe(degrade="autoencoder:x", degrade_from=-1))


@pytest.fixture(scope="module")
def tiny_upsampler_run(tiny_shapes, tmp_path_factory):
    """A 6-step upsampler run on tiny_shapes: 16 px → 32 px, trained on 16-px crops."""
    run = tmp_path_factory.mktemp("up")
    model = {**TINY_UNET, "class_embed_type": "timestep"}
    recipe = UpsamplerRecipe(data=str(tiny_shapes), size=32, factor=2, crop=16, model=model, aug_max=200,
                             sampling=UpsamplerSettings(steps=3, aug_level=50),
                             train=TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=1, log_every=2,
                                               checkpoint_every=6, sample_every=6, bf16=False))
    result = train_upsampler(recipe, run, progress=False)
    return run, result


def test_upsampler_stage_trains_and_saves_its_folder(tiny_upsampler_run):
    run, result = tiny_upsampler_run
    assert result["steps"] == 6
    stage = Upsampler.load(run)
    assert stage.factor == 2 and stage.settings == UpsamplerSettings(steps=3, aug_level=50)
    assert stage.unet.config.in_channels == 15 and stage.schedule.prediction_type.value == "v_prediction"
    assert (run / "samples").is_dir() and any((run / "samples").iterdir())


@pytest.fixture(scope="module")
def cascade_folder(tiny_diffusion_run, tiny_upsampler_run, tmp_path_factory):
    """The tiny base model folder with the tiny upsampler beside its unet/ and vae/."""
    folder = tmp_path_factory.mktemp("cascade") / "model"
    shutil.copytree(tiny_diffusion_run, folder, ignore=shutil.ignore_patterns("checkpoints", "samples", "cache"))
    shutil.copytree(tiny_upsampler_run[0], folder / "upsampler", ignore=shutil.ignore_patterns("checkpoints", "samples", "cache"))
    return folder


@pytest.fixture(scope="module")
def cascade(cascade_folder):
    return Pipeline.load(cascade_folder, precision="fp32")


def test_cascade_makes_the_big_image_by_default_and_the_small_one_on_request(cascade):
    assert cascade.sizes == (16, 32)
    big = cascade(["a red circle"], steps=2, output="tensor")
    small = cascade(["a red circle"], steps=2, output="tensor", size=16)
    assert big.shape == (1, 3, 32, 32) and small.shape == (1, 3, 16, 16)
    again = cascade(["a red circle"], steps=2, output="tensor")
    assert torch.equal(big, again)  # deterministic per seed
    with pytest.raises(CarraraError, match="16 or 32"):
        cascade(["a red circle"], steps=2, size=64)


def test_cascade_image_i_depends_on_seed_plus_i_only(cascade):
    pair = cascade(["a red circle", "a blue square"], steps=2, seed=3, output="tensor")
    alone = cascade(["a blue square"], steps=2, seed=4, output="tensor")
    torch.testing.assert_close(pair[1:], alone, atol=1e-5, rtol=0)


def test_upsampler_sees_the_small_image(cascade):
    """The stage is conditioned on its input: two different small images give two different big ones."""
    stage = cascade.upsampler
    states = cascade.text_encoder.encode(["a red circle"])[0]
    a = stage(torch.full((1, 3, 16, 16), -0.8), states, states, seed=0)
    b = stage(torch.full((1, 3, 16, 16), 0.8), states, states, seed=0)
    assert (a - b).abs().mean() > 1e-3


def test_progress_counts_both_stages(cascade):
    seen = []
    cascade(["a red circle"], steps=2, callback=lambda i, n, decode: seen.append((i, n, tuple(decode().shape))))
    assert [(i, n) for i, n, _ in seen] == [(0, 5), (1, 5), (2, 5), (3, 5), (4, 5)]
    assert seen[0][2] == (1, 3, 16, 16) and seen[-1][2] == (1, 3, 32, 32)  # previews at each stage's size


def inline(d: dict) -> str:
    """A TOML inline table (JSON values are TOML values for lists, ints and strings)."""
    return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + "}"


def test_a_recipe_with_an_upsampler_table_builds_the_cascade(tiny_ae_run, tmp_path):
    """`carrara recipe` reuses a finished autoencoder (`from`), trains base and upsampler, assembles out/model."""
    from carrara.recipe import run_recipe

    (tmp_path / "r.toml").write_text(f"""
[data]
dataset = "shapes"
n = 24
size = 16
[autoencoder]
from = "{tiny_ae_run}"
[diffusion]
prediction_type = "v_prediction"
pooled = true
sample_prompts = ["a red circle"]
model = {inline(TINY_UNET)}
train = {{steps = 3, batch_size = 4, warmup_steps = 1, sample_every = 1000, checkpoint_every = 3, bf16 = false}}
[upsampler]
size = 32
crop = 16
model = {inline({**TINY_UNET, "class_embed_type": "timestep"})}
sampling = {{steps = 2}}
degrade = "autoencoder"
train = {{steps = 3, batch_size = 4, warmup_steps = 1, sample_every = 1000, checkpoint_every = 3, bf16 = false}}
""")
    result = run_recipe(tmp_path / "r.toml", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "autoencoder").exists()  # reused, not retrained
    pipe = Pipeline.load(result["model"], precision="fp32")
    assert pipe.sizes == (16, 32) and pipe.upsampler.settings.steps == 2
    assert pipe.upsampler.degrade == "autoencoder"  # trained on the base's own autoencoder's round trip
    assert pipe(["a red circle"], steps=2, output="tensor").shape == (1, 3, 32, 32)
    again = run_recipe(tmp_path / "r.toml", tmp_path / "out", resume=True, progress=False)  # all done: re-assembles
    assert Pipeline.load(again["model"], precision="fp32").sizes == (16, 32)


def test_assemble_cascade_refuses_what_is_not_a_model(tiny_diffusion_run, tmp_path):
    from carrara.upsampler import assemble_cascade

    with pytest.raises(CarraraError, match="not a upsampler folder|not an upsampler folder|upsampler folder"):
        assemble_cascade(tiny_diffusion_run, tmp_path / "nothing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_cli_trains_assembles_exports_and_generates_the_cascade(tiny_shapes, tiny_diffusion_run, tmp_path):
    """`carrara train upsampler`, `export cascade`, `generate --size`, `export default` of a cascade, end to end."""
    from carrara.cli import main
    from carrara.png import read_png_metadata

    model = json.dumps({**TINY_UNET, "class_embed_type": "timestep"})
    assert main(["train", "upsampler", "--data", str(tiny_shapes), "--size", "32", "--out", str(tmp_path / "up"),
                 "--steps", "2", "--batch-size", "4", "--quiet", "--set", "crop=16", "--set", f"model={model}",
                 "--set", "sampling.steps=2", "--set", "train.bf16=false", "--set", "train.warmup_steps=1"]) == 0
    assert main(["export", "cascade", "--base", str(tiny_diffusion_run), "--upsampler", str(tmp_path / "up"),
                 "--out", str(tmp_path / "cascade")]) == 0
    for size in (16, 32):
        out = tmp_path / f"img{size}.png"
        argv = ["generate", "a red circle", "--model", str(tmp_path / "cascade"), "--steps", "2", "--quiet",
                "--precision", "fp32", "-o", str(out)]
        assert main(argv + (["--size", "16"] if size == 16 else [])) == 0
        meta = read_png_metadata(out)
        assert meta["size"] == size and ("upsampler" in meta) == (size == 32)
        stage_hash = Upsampler.load(tmp_path / "cascade" / "upsampler").weights_hash
        assert meta.get("upsampler_hash") == (stage_hash if size == 32 else None) and len(stage_hash) == 12
        assert main(["generate", "--from", str(out), "--quiet", "-o", str(tmp_path / f"again{size}.png")]) == 0
        from PIL import Image
        assert Image.open(out).size == (size, size)
        assert Image.open(out).tobytes() == Image.open(tmp_path / f"again{size}.png").tobytes()
    assert main(["export", "default", "--model", str(tmp_path / "cascade"), "--out", str(tmp_path / "packaged")]) == 0
    packaged = Pipeline.load(tmp_path / "packaged", precision="fp32")
    assert packaged.sizes == (16, 32)
    for stage, run in (("upsampler", tmp_path / "up"), ("diffusion", tiny_diffusion_run)):  # the cascade kept both
        assert (tmp_path / "packaged" / "training" / stage / "log.txt").read_text() == (run / "log.txt").read_text()
    from safetensors import safe_open
    with safe_open(tmp_path / "packaged" / "upsampler" / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118 (safe_open is not iterable)


def test_the_server_offers_both_sizes_of_a_cascade(cascade, tmp_path):
    """GET /api/model lists the sizes; width/height pick one (default the largest); other sizes are a 422."""
    import time

    from fastapi.testclient import TestClient

    from carrara.serve.app import create_app

    def finished(client, job) -> dict:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            info = client.get(f"/api/jobs/{job['id']}").json()
            if info["status"] in ("done", "failed", "cancelled"):
                return info
            time.sleep(0.05)  # polling a state change with a deadline, not waiting a fixed time
        raise AssertionError("job did not finish")

    with TestClient(create_app(cascade, tmp_path / "gallery"), base_url="http://127.0.0.1") as client:
        model = client.get("/api/model").json()
        assert model["sizes"] == [16, 32] and model["image_size"] == [32, 32]
        for body, side in (({}, 32), ({"width": 16, "height": 16}, 16), ({"height": 16}, 16)):
            job = client.post("/api/generate", json={"prompt": "a red circle", "steps": 2, **body}).json()
            info = finished(client, job)
            assert info["status"] == "done" and info["images"][0]["size"] == [side, side]
        for body in ({"width": 64}, {"width": 16, "height": 32}):
            response = client.post("/api/generate", json={"prompt": "a red circle", **body})
            assert response.status_code == 422 and "16×16 or 32×32" in response.json()["message"]


def _sharp_image(size: int = 32) -> torch.Tensor:
    """A disc and a bar with hard edges (1, 3, size, size) in [−1, 1]: what bicubic ×2 blurs."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size * 0.4) ** 2 + (xx - size * 0.6) ** 2 < (size * 0.25) ** 2).float()
    bar = ((xx > size * 0.1) & (xx < size * 0.25)).float()
    return torch.stack([disc * 2 - 1, bar * 2 - 1, (disc * bar) * 2 - 1])[None]


def test_residual_target_and_pixels_invert_each_other():
    """x_0 = (s2d(x) − s2d(bicubic(y))) / k, and `pixels` puts the image back (SRDiff's residual, scaled)."""
    high = _sharp_image()
    low = downsample(high, 2)
    stage = Upsampler(unet=UNet2DConditionModel(UNetConfig.from_diffusers_config(LEVELED)),
                      schedule=NoiseSchedule.from_config("cosine", prediction_type="v_prediction"), factor=2,
                      residual_scale=0.25)
    x0 = stage.target(high, low)  # (1, 12, 16, 16)
    assert x0.shape == (1, 12, 16, 16)
    reference = bicubic_reference(low, 2)
    torch.testing.assert_close(stage.pixels(x0, reference), high, atol=1e-5, rtol=0)
    torch.testing.assert_close(stage.pixels(torch.zeros_like(x0), reference), depth_to_space(reference, 2))
    flat = torch.full((2, 3, 8, 8), 0.3)
    assert residual_std(flat, 2) < 1e-6  # bicubic of a flat image is the image: no residual
    assert residual_std(high, 2) == pytest.approx(((x0 * 0.25) ** 2).mean().sqrt().item(), rel=1e-5)
    uint8 = ((high + 1) * 127.5).round().to(torch.uint8)  # the trainer's stored images
    assert residual_std(uint8, 2) == pytest.approx(residual_std(uint8.float() / 127.5 - 1, 2), rel=1e-6)


def test_stage_learns_what_bicubic_misses():
    """Overfitting one sharp image, the stage's x̂0 beats bicubic ×2 of the clean small image by a wide margin at
    moderate and high noise: the condition is used, and the residual adds the edges bicubic blurs. (Its plain
    pixel-space predecessor was still worse than bicubic after 1,000 real steps: docs/decisions.md 2026-11-30.)"""
    from carrara.diffusion.objectives import diffusion_loss, sample_t_and_noise
    from carrara.diffusion.schedule import add_noise
    from carrara.upsampler import upsampler_inputs

    torch.manual_seed(0)
    high = _sharp_image()
    low = downsample(high, 2)
    schedule = NoiseSchedule.from_config("cosine", prediction_type="v_prediction")
    stage = Upsampler(unet=UNet2DConditionModel(UNetConfig.from_diffusers_config(LEVELED)).train(), schedule=schedule,
                      factor=2, residual_scale=residual_std(high, 2))
    text, level = torch.zeros(1, 3, 16), torch.zeros(1, dtype=torch.long)
    x0 = stage.target(high, low)
    opt = torch.optim.AdamW(stage.unet.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        t, noise = sample_t_and_noise(x0.expand(4, -1, -1, -1), schedule, g)
        loss = diffusion_loss(lambda x, t: upsampler_inputs(stage.unet, x, t, low.expand(4, -1, -1, -1),
                                                            text.expand(4, -1, -1), level.expand(4)),
                              x0.expand(4, -1, -1, -1), t, noise, schedule)
        opt.zero_grad()
        loss.backward()
        opt.step()
    stage.unet.eval()
    bicubic_err = (stage.pixels(torch.zeros_like(x0), bicubic_reference(low, 2)) - high).pow(2).mean()
    for t in (100, 500):
        xt = add_noise(schedule, x0, torch.randn(x0.shape, generator=g), t)
        with torch.no_grad():
            v = upsampler_inputs(stage.unet, xt, torch.tensor([t]), low, text, level)
        ab = schedule.alphas_cumprod[t].float()
        x0_hat = ab.sqrt() * xt - (1 - ab).sqrt() * v
        err = (stage.pixels(x0_hat, bicubic_reference(low, 2)) - high).pow(2).mean()
        assert err < 0.5 * bicubic_err, (t, err.item(), bicubic_err.item())


def test_an_upsampler_run_can_start_from_a_trained_stage(tiny_shapes, tiny_upsampler_run, tmp_path):
    """init_unet: the new run's network starts as the given stage's (lr 0 keeps it there); another shape is refused."""
    start = Upsampler.load(tiny_upsampler_run[0])
    model = {**TINY_UNET, "class_embed_type": "timestep"}
    recipe = UpsamplerRecipe(data=str(tiny_shapes), size=32, factor=2, crop=16, model=model,
                             init_unet=str(tiny_upsampler_run[0]), sampling=UpsamplerSettings(steps=2),
                             train=TrainConfig(steps=1, batch_size=4, lr=0.0, warmup_steps=0, checkpoint_every=1,
                                               sample_every=10, bf16=False))
    train_upsampler(recipe, tmp_path / "ft", progress=False)
    for (name, a), b in zip(start.unet.state_dict().items(), Upsampler.load(tmp_path / "ft").unet.state_dict().values()):
        assert torch.equal(a, b), name
    recipe.model = {**model, "block_out_channels": [16, 32]}
    with pytest.raises(CarraraError, match="another architecture"):
        train_upsampler(recipe, tmp_path / "other", progress=False)


def test_a_recipe_finetune_table_continues_the_base_and_the_cascade_uses_it(tiny_ae_run, tmp_path):
    """`[finetune]` is a second run started from out/diffusion's weights, with its own keys (here lr and steps) over
    the diffusion stage's; the cascade's base is the fine-tuned model, not the first phase."""
    from carrara.export import export_default
    from carrara.modelfolder import resolve
    from carrara.recipe import run_recipe

    train = "{steps = 2, batch_size = 4, warmup_steps = 1, sample_every = 1000, checkpoint_every = 2, bf16 = false}"
    (tmp_path / "r.toml").write_text(f"""
[data]
dataset = "shapes"
n = 24
size = 16
[autoencoder]
from = "{tiny_ae_run}"
[diffusion]
model = {inline(TINY_UNET)}
train = {train}
[finetune]
train = {{steps = 3, lr = 1e-5, warmup_steps = 1}}
[upsampler]
size = 32
crop = 16
model = {inline({**TINY_UNET, "class_embed_type": "timestep"})}
sampling = {{steps = 2}}
train = {train}
""")
    result = run_recipe(tmp_path / "r.toml", tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert result["diffusion"] == str(out / "finetune")
    config = json.loads((out / "finetune" / "config.json").read_text())
    assert config["init_unet"] == str(out / "diffusion") and config["train"]["lr"] == 1e-5
    assert config["train"]["steps"] == 3 and config["train"]["batch_size"] == 4  # the rest from [diffusion]
    tuned, first, cascade = (resolve(str(p)).unet_hash() for p in (out / "finetune", out / "diffusion", out / "model"))
    assert cascade == tuned != first
    records = out / "model" / "training"  # both phases' records travel with the cascade, and into an export
    assert json.loads((records / "diffusion" / "config.json").read_text())["init_unet"] == str(out / "diffusion")
    assert (records / "diffusion-init" / "log.txt").read_text() == (out / "diffusion" / "log.txt").read_text()
    export_default(out / "model", tmp_path / "exported")
    assert sorted(p.name for p in (tmp_path / "exported" / "training").iterdir()) == \
        ["diffusion", "diffusion-init", "upsampler"]


def test_a_recipe_finetune_on_category_captions_is_refused_for_shapes(tiny_ae_run, tmp_path):
    from carrara.recipe import run_recipe

    (tmp_path / "r.toml").write_text(f"""
[data]
dataset = "shapes"
n = 24
size = 16
[autoencoder]
from = "{tiny_ae_run}"
[diffusion]
train = {{steps = 2}}
[finetune]
categories = true
""")
    with pytest.raises(CarraraError, match=r"categories = true \(\[data\] or \[finetune\]\) applies to the emoji"):
        run_recipe(tmp_path / "r.toml", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "diffusion").exists()  # refused before any training


def test_eval_judges_a_cascade_at_the_datas_side(cascade_folder, tiny_shapes, tiny_clip_run, tmp_path):
    """`carrara eval` on a cascade against data at its base's side generates the base's images alone (no upsampler),
    and against data at neither side is one clear error."""
    from carrara.data.shapes import build_shapes
    from carrara.evaluate.suite import EvalSettings, run_eval

    settings = {"n": 4, "metrics": ("clipscore",), "clip": str(tiny_clip_run[0]), "steps": 2, "batch_size": 4}
    report = run_eval(EvalSettings(model=str(cascade_folder), data=str(tiny_shapes), **settings), tmp_path / "base",
                      progress=False)
    assert report["metrics"]  # 16-px images were made and scored: the 32-px cascade would have been refused
    with pytest.raises(CarraraError, match="evaluate against data of the model's size"):
        bigger = tmp_path / "data48"
        build_shapes(bigger, n=4, size=48, seed=0, progress=False)
        run_eval(EvalSettings(model=str(cascade_folder), data=str(bigger), **settings), tmp_path / "x",
                 progress=False)


def test_quantize_calibrates_the_upsampler_too_and_int8_runs_both(cascade_folder, tmp_path, capsys):
    """`carrara quantize` on a cascade writes the upsampler's own calibration (keyed by its weights) beside the base's;
    int8 then runs both U-Nets in int8, near fp32 at the big size; an upsampler without one stays fp32."""
    from carrara.models import int8

    model = tmp_path / "model"
    shutil.copytree(cascade_folder, model)
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    assert main(["quantize", "--model", str(model), "--prompts", str(tmp_path / "p.txt"), "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "calibrating the upsampler" in out and "the U-Net and the upsampler in int8" in out
    fp32 = Pipeline.load(model, precision="fp32")
    record = json.loads((model / "upsampler" / "unet" / int8.CALIBRATION_FILE).read_text())
    assert record["unet_hash"] == fp32.upsampler.weights_hash != fp32.model_hash
    assert record["settings"]["steps"] == fp32.upsampler.settings.steps and record["settings"]["prompts"] == 2
    quantized = Pipeline.load(model, precision="int8")
    assert int8.is_int8(quantized.unet) and int8.is_int8(quantized.upsampler.unet)
    a, b = (p(["a red circle", "a green star"], seed=1, steps=3, output="tensor") for p in (fp32, quantized))
    assert a.shape[-1] == 32 and 0 < int8.pixel_diff_255(a, b) <= 8.0
    up_file = model / "upsampler" / "unet" / int8.CALIBRATION_FILE
    up_file.write_text(json.dumps({**record, "unet_hash": "ffffffffffff"}))
    with pytest.raises(CarraraError, match="calibrated for U-Net weights ffffffffffff"):
        Pipeline.load(model, precision="int8")  # a stale calibration is refused, not silently left in fp32
    up_file.unlink()
    base_only = Pipeline.load(model, precision="int8")
    assert int8.is_int8(base_only.unet) and not int8.is_int8(base_only.upsampler.unet)
