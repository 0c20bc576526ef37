"""LoRA (models/lora.py, train/diffusion.py --lora-rank) and fine-tuning from a model (--from): against peft and
diffusers' `load_lora_adapter` / `load_lora_weights`, bit-exact where nothing may change, and hostile inputs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_UNET
from PIL import Image
from reference import randomize_, reference_pair
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from carrara.cli import main
from carrara.errors import CarraraError
from carrara.modelfolder import resolve
from carrara.models.config import UNetConfig
from carrara.models.lora import TARGETS, apply_loras, merge_lora, parse_lora_arg, read_lora, save_lora, unmerge_lora
from carrara.models.unet import UNet2DConditionModel
from carrara.pipeline import Pipeline
from carrara.png import read_png_metadata
from carrara.recipe import load_recipe_file, run_recipe
from carrara.train.diffusion import LORA, add_lora, fine_tune_recipe, lora_state, train_diffusion

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # test_unet.py's bound for carrara's U-Net against diffusers' in fp32
REF = {**TINY_UNET, "sample_size": 8, "cross_attention_dim": 16}  # test_unet.py's TINY with conftest's blocks


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 917]), torch.randn(2, 5, 16, generator=g)


def random_adapter(unet, path, *, rank=2, alpha=None, seed=0, std=0.2):
    """An adapter file for `unet` (a carrara U-Net, left unwrapped) with nonzero B: a LoRA that changes the output."""
    wrapped = add_lora(copy_of(unet), rank, alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    save_lora(path, lora_state(wrapped), rank=rank, alpha=rank if alpha is None else alpha)
    return wrapped


def copy_of(unet):
    other = UNet2DConditionModel(unet.config).eval()
    other.load_state_dict(unet.state_dict())
    return other


@pytest.fixture(scope="module")
def pair():
    return reference_pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, UNetConfig, REF)


def test_a_zero_lora_changes_nothing(pair, tmp_path):
    """peft's init (B = 0): the wrapped U-Net, its saved file merged at any weight, all equal the base exactly."""
    _, ours = pair
    x, t, text = inputs()
    with torch.no_grad():
        base = ours(x, t, text)
        wrapped = add_lora(copy_of(ours), 4, None)
        assert torch.equal(wrapped(x, t, text), base)
        save_lora(tmp_path / "zero.safetensors", lora_state(wrapped), rank=4, alpha=4)
        merged = copy_of(ours)
        merge_lora(merged, read_lora(tmp_path / "zero.safetensors"), 1.7)
        assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), ours.state_dict().values()))
        assert torch.equal(merged(x, t, text), base)


def test_the_file_is_diffusers_layout_and_only_the_attention_projections(pair, tmp_path):
    _, ours = pair
    random_adapter(ours, tmp_path / "a.safetensors", rank=2, alpha=3)
    tensors = load_file(tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert config == {"unet.r": 2, "unet.lora_alpha": 3, "unet.target_modules": list(TARGETS)}
    n_attention = sum(1 for name, m in ours.named_modules() if name.endswith((".attn1", ".attn2")))
    assert len(tensors) == n_attention * len(TARGETS) * 2  # an A and a B for each projection of each attention
    for key, value in tensors.items():
        module, kind = key.removeprefix("unet.").rsplit(".lora_", 1)
        assert key.startswith("unet.") and kind in ("A.weight", "B.weight") and module.endswith(TARGETS)
        out_f, in_f = dict(ours.named_modules())[module].weight.shape
        assert value.shape == ((2, in_f) if kind == "A.weight" else (out_f, 2))


@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_diffusers_loads_the_file_and_computes_what_carrara_computes(pair, tmp_path, weight):
    """α ≠ r and a weight ≠ 1, so the scale α/r·weight is checked: diffusers' U-Net with the adapter (through peft)
    vs carrara's U-Net with it merged, and vs carrara's U-Net wrapped by peft (the training path)."""
    theirs, ours = pair
    theirs = randomize_(diffusers.UNet2DConditionModel.from_config(theirs.config))
    theirs.load_state_dict(ours.state_dict())
    wrapped = random_adapter(ours, tmp_path / "a.safetensors", rank=2, alpha=3)
    # use_safetensors=True: without it diffusers 0.42.1 reads a file path's tensors but not its metadata (α)
    theirs.load_lora_adapter(str(tmp_path / "a.safetensors"), prefix="unet", adapter_name="a", use_safetensors=True)
    theirs.set_adapters(["a"], weights=[weight])
    merged = copy_of(ours)
    merge_lora(merged, read_lora(tmp_path / "a.safetensors"), weight)
    x, t, text = inputs()
    with torch.no_grad():
        ref = theirs(x, t, text).sample
        assert (ref - ours(x, t, text)).abs().max() > 50 * TOL  # the adapter matters
        assert (merged(x, t, text) - ref).abs().max() <= TOL
        if weight == 1.0:
            assert (wrapped(x, t, text) - ref).abs().max() <= TOL


def test_weight_zero_is_the_base_one_is_not_and_unmerge_restores_it_exactly(pair, tmp_path):
    _, ours = pair
    random_adapter(ours, tmp_path / "a.safetensors")
    adapter = read_lora(tmp_path / "a.safetensors")
    x, t, text = inputs()
    unet = copy_of(ours)
    with torch.no_grad():
        base = unet(x, t, text)
        originals = merge_lora(unet, adapter, 0.0)
        assert torch.equal(unet(x, t, text), base)
        unmerge_lora(unet, originals)
        originals = merge_lora(unet, adapter, 1.0)
        assert (unet(x, t, text) - base).abs().max() > 1e-2
        unmerge_lora(unet, originals)
        assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), ours.state_dict().values()))


def test_stable_diffusion_pipeline_with_load_lora_weights_makes_carraras_image(tiny_diffusion_run, tmp_path):
    """test_export.py's comparison (same x_T, DDIM η = 0, guidance 3, mean |Δ| ≤ 1/255) with an adapter on both."""
    out = tmp_path / "sd"
    assert main(["export", "diffusers", "--model", str(tiny_diffusion_run), "--out", str(out), ]) == 0
    pipe = Pipeline.load(tiny_diffusion_run, precision="fp32")
    random_adapter(pipe.unet, tmp_path / "a.safetensors", rank=2, alpha=3, std=0.3)  # α ≠ r: the metadata is read
    prompts, steps, guidance, seed = ["a large red circle on the left", "a small blue square"], 6, 3.0, 11
    before = pipe(prompts, steps=steps, sampler="ddim", guidance=guidance, seed=seed, output="tensor")
    apply_loras(pipe.unet, [str(tmp_path / "a.safetensors")])
    ours = pipe(prompts, steps=steps, sampler="ddim", guidance=guidance, seed=seed, output="tensor")
    x_T = torch.cat([torch.randn(1, *pipe.latent_shape(), generator=torch.Generator().manual_seed(seed + i))
                     for i in range(len(prompts))])
    sd = diffusers.StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    sd.load_lora_weights(str(tmp_path / "a.safetensors"))
    theirs = sd(prompts, num_inference_steps=steps, guidance_scale=guidance, eta=0.0, latents=x_T,
                output_type="np").images  # (2, H, W, 3) in [0, 1]
    to_np = lambda images: ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    diff = np.abs(to_np(ours) - theirs).mean()
    assert diff <= 1 / 255, diff
    assert np.abs(to_np(before) - theirs).mean() > 10 * max(diff, 1e-4)  # the adapter changed the image


# ---------------------------------------------------------------------------------------------------------------
# Training: --from and --lora-rank


def tiny_train(recipe, steps=4):
    recipe.train = type(recipe.train)(steps=steps, batch_size=8, lr=recipe.train.lr, warmup_steps=1, log_every=1,
                                      checkpoint_every=2, sample_every=steps, bf16=False)
    return recipe


@pytest.fixture(scope="module")
def lora_run(tiny_shapes, tiny_diffusion_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora")
    recipe = tiny_train(fine_tune_recipe(str(tiny_shapes), str(tiny_diffusion_run), lora_rank=2))
    result = train_diffusion(recipe, run, progress=False)
    return run, result


def test_fine_tune_defaults_are_a_small_fine_tune_at_the_models_size(tiny_shapes, tiny_diffusion_run):
    full = fine_tune_recipe(str(tiny_shapes), str(tiny_diffusion_run))
    lora = fine_tune_recipe(str(tiny_shapes), str(tiny_diffusion_run), lora_rank=4)
    assert (full.size, full.train.steps, full.train.batch_size, full.train.lr) == (16, 500, 16, 1e-4)
    assert (lora.lora_rank, lora.train.steps, lora.train.lr) == (4, 500, 1e-3)
    assert full.train is not lora.train  # each recipe owns its settings (--set changes one)
    with pytest.raises(CarraraError, match="makes 16-pixel images"):
        fine_tune_recipe(str(tiny_shapes), str(tiny_diffusion_run), size=32)


def test_lora_training_changes_only_the_adapters(lora_run, tiny_diffusion_run):
    run, result = lora_run
    source = load_file(resolve(tiny_diffusion_run).unet / "diffusion_pytorch_model.safetensors")
    checkpoint = max((run / "checkpoints").glob("step_*"))
    assert checkpoint.name == "step_0000004"
    for part in ("model", "ema"):
        state = load_file(checkpoint / f"{part}.safetensors")
        base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
        assert base.keys() == source.keys()
        assert all(torch.equal(base[k], source[k].float()) for k in source), part  # bit-identical
    adapter = load_file(run / "lora.safetensors")
    b = [v for k, v in adapter.items() if k.endswith("lora_B.weight")]
    assert b and all(v.abs().max() > 0 for v in b)  # B started at 0: every one of them learned
    config = json.loads((run / "config.json").read_text())
    assert (config["from_model"], config["lora_rank"], config["autoencoder"]) == (str(tiny_diffusion_run), 2,
                                                                                 str(tiny_diffusion_run))
    assert result["lora"] == str(run / "lora.safetensors")
    for name in ("log.txt", "loss.png", "metrics.jsonl", "samples/step_0000004.png"):
        assert (run / name).is_file(), name
    assert not (run / "unet").exists()  # the adapter alone, not a copy of the model
    assert (run / "lora.safetensors").stat().st_size < 0.2 * source_bytes(tiny_diffusion_run)


def source_bytes(run) -> int:
    return (resolve(run).unet / "diffusion_pytorch_model.safetensors").stat().st_size


def test_a_lora_run_resumes_exactly(lora_run, tiny_shapes, tiny_diffusion_run, tmp_path):
    run, _ = lora_run
    recipe = lambda: tiny_train(fine_tune_recipe(str(tiny_shapes), str(tiny_diffusion_run), lora_rank=2))
    train_diffusion(recipe(), tmp_path, progress=False, stop_at=2)
    train_diffusion(recipe(), tmp_path, progress=False, resume=True)
    whole, resumed = load_file(run / "lora.safetensors"), load_file(tmp_path / "lora.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_full_fine_tune_from_a_model_starts_from_its_unet_and_reuses_its_parts(tiny_shapes, tiny_diffusion_run,
                                                                               tmp_path):
    """lr = 0: the run's exported U-Net must be the source's bit for bit; vae/ and the schedule are the source's."""
    out = tmp_path / "ft"
    assert main(["train", "diffusion", "--from", str(tiny_diffusion_run), "--data", str(tiny_shapes), "--out",
                 str(out), "--steps", "2", "--batch-size", "4", "--set", "train.lr=0", "--set", "train.bf16=false",
                 "--set", "train.sample_every=2", "--quiet"]) == 0
    src, got = resolve(tiny_diffusion_run), resolve(out)
    for part in ("unet", "vae"):
        a, b = (load_file(f.root / part / "diffusion_pytorch_model.safetensors") for f in (src, got))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert json.loads((got.unet / "config.json").read_text()) == json.loads((src.unet / "config.json").read_text())
    assert {k: got.scheduler_config[k] for k in src.scheduler_config} == src.scheduler_config
    assert Pipeline.load(out, precision="fp32").sizes == (16,)


def test_the_lora_recipe_states_the_defaults_and_trains_no_autoencoder(tiny_shapes, tiny_diffusion_run, tmp_path,
                                                                       capsys):
    path = Path(__file__).resolve().parent.parent / "recipes" / "lora-example.toml"
    table = load_recipe_file(path)
    assert (table["diffusion"]["from_model"], table["diffusion"]["lora_rank"]) == ("default", 4)
    assert table["diffusion"]["train"] == {k: getattr(LORA, k) for k in table["diffusion"]["train"]}
    out = tmp_path / "r"
    run_recipe(path, out, progress=False, overrides=[
        f"data.dataset={tiny_shapes}", "data.size=16", f"diffusion.from_model={tiny_diffusion_run}",
        "diffusion.train.steps=2", "diffusion.train.batch_size=4", "diffusion.train.bf16=false",
        "diffusion.train.sample_every=2"])
    assert read_lora(out / "diffusion" / "lora.safetensors").rank == 4
    assert not (out / "autoencoder").exists()  # the model's own autoencoder was used
    assert f"--model {tiny_diffusion_run} --lora {out / 'diffusion' / 'lora.safetensors'}" in capsys.readouterr().out


def run_cli(argv: list[str]) -> int:
    """main's exit code, including argparse's (a SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv, message", [
    (["--from", "{missing}"], "does not exist"),
    (["--lora-rank", "2", "--autoencoder", "{run}"], "--lora-rank needs --from"),
    (["--from", "{run}", "--autoencoder", "{run}"], "drop --autoencoder"),
    (["--from", "{run}", "--size", "32"], "makes 16-pixel images"),
    (["--from", "{run}", "--lora-rank", "0"], "positive whole number"),
    (["--from", "{run}", "--data", "{small}"], "too small"),
    (["--from", "{shapes}"], "not a model folder"),
], ids=["missing", "lora-without-from", "with-autoencoder", "size", "rank-0", "images-too-small", "not-a-model"])
def test_train_from_refuses_in_one_line(argv, message, tiny_diffusion_run, tiny_shapes, tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):  # 4×4 images for a 16-pixel model
        Image.new("RGB", (4, 4), (200, 10, 10)).save(small / f"{i}.png")
        (small / f"{i}.txt").write_text("a red square")
    names = {"missing": tmp_path / "nope", "run": tiny_diffusion_run, "shapes": tiny_shapes, "small": small}
    argv = ["train", "diffusion", "--data", str(tiny_shapes), "--out", str(tmp_path / "run"), "--quiet",
            *(a.format(**names) for a in argv)]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith(("carrara: error:", "carrara train: error:"))


# ---------------------------------------------------------------------------------------------------------------
# Using an adapter: generate --lora, serve --lora, and files that must be refused


@pytest.fixture(scope="module")
def adapter_file(tiny_diffusion_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "a.safetensors"
    random_adapter(Pipeline.load(tiny_diffusion_run, precision="fp32").unet, path, std=0.3)
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_with_lora_records_it_and_weight_zero_is_the_base(tiny_diffusion_run, adapter_file, tmp_path):
    common = ["generate", "a red circle", "--model", str(tiny_diffusion_run), "--steps", "4", "--precision", "fp32",
              "--quiet"]
    assert main([*common, "-o", str(tmp_path / "base.png")]) == 0
    assert main([*common, "--lora", f"{adapter_file}:0", "-o", str(tmp_path / "zero.png")]) == 0
    assert main([*common, "--lora", f"{adapter_file}:0.5", "--lora", str(adapter_file),
                 "-o", str(tmp_path / "lora.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "zero.png"), pixels(tmp_path / "base.png"))
    assert np.abs(pixels(tmp_path / "lora.png") - pixels(tmp_path / "base.png")).mean() > 2
    sha = read_lora(adapter_file).sha256
    assert len(sha) == 12 and "lora" not in read_png_metadata(tmp_path / "base.png")
    assert read_png_metadata(tmp_path / "lora.png")["lora"] == [
        {"file": str(adapter_file.resolve()), "sha256": sha, "weight": 0.5},
        {"file": str(adapter_file.resolve()), "sha256": sha, "weight": 1.0}]


def test_from_reapplies_the_recorded_adapters_and_says_when_one_is_gone(tiny_diffusion_run, adapter_file, tmp_path,
                                                                        capsys):
    lora = tmp_path / "mine.safetensors"
    lora.write_bytes(adapter_file.read_bytes())
    common = ["generate", "a red circle", "--model", str(tiny_diffusion_run), "--steps", "4", "--precision", "fp32",
              "--quiet"]
    assert main([*common, "--lora", f"{lora}:0.5", "-o", str(tmp_path / "lora.png")]) == 0
    assert main(["generate", "--from", str(tmp_path / "lora.png"), "--quiet", "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "lora.png"))
    assert read_png_metadata(tmp_path / "again.png")["lora"][0]["weight"] == 0.5
    lora.unlink()
    capsys.readouterr()
    assert main(["generate", "--from", str(tmp_path / "lora.png"), "--quiet", "-o", str(tmp_path / "x.png")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "which is gone" in err[0] and not (tmp_path / "x.png").exists()


def test_serve_merges_the_lora_into_the_model_it_serves(tiny_diffusion_run, adapter_file, tmp_path, monkeypatch):
    import carrara.serve.app as app_module

    served = []
    monkeypatch.setattr(app_module, "server", lambda app: type("S", (), {"run": lambda self, sockets: served.append(
        app)})())
    assert main(["serve", "--model", str(tiny_diffusion_run), "--port", "0", "--data-dir", str(tmp_path / "g"),
                 "--lora", f"{adapter_file}:0.7"]) == 0
    pipe = served[0].state.models.get()
    expected = Pipeline.load(tiny_diffusion_run, precision=pipe.precision).unet
    merge_lora(expected, read_lora(adapter_file), 0.7)
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), expected.state_dict().values()))
    assert pipe.loras == [{"file": str(adapter_file.resolve()), "sha256": read_lora(adapter_file).sha256,
                           "weight": 0.7}]


def test_parse_lora_arg(tmp_path):
    odd = tmp_path / "x:0.5"
    odd.write_bytes(b"")
    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg("a.safetensors:0.25") == ("a.safetensors", 0.25)
    assert parse_lora_arg("runs/a:b/c.safetensors") == ("runs/a:b/c.safetensors", 1.0)
    assert parse_lora_arg(str(odd)) == (str(odd), 1.0)  # an existing file's name is never split
    assert parse_lora_arg("a.safetensors:-1") == ("a.safetensors", -1.0)


def hostile(kind: str, adapter_file, tmp_path) -> str:
    """A --lora argument that must be refused."""
    good = load_file(adapter_file)
    with safe_open(str(adapter_file), "pt") as f:
        header = f.metadata()
    path = tmp_path / f"{kind}.safetensors"
    key = next(k for k in good if k.endswith("to_q.lora_A.weight"))
    if kind == "missing":
        return str(tmp_path / "nope.safetensors")
    if kind == "weight-not-a-number":
        return f"{adapter_file}:strong"
    if kind == "weight-inf":
        return f"{adapter_file}:inf"
    if kind == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 10)
    elif kind == "model-weights":  # a U-Net's weights, not an adapter
        save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, path)
    else:
        tensors = dict(good)
        if kind == "other-model":  # an adapter trained for a U-Net with other widths
            tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)
        elif kind == "unknown-module":
            tensors[key.replace("to_q", "to_z")] = tensors.pop(key)
            b = key.replace("lora_A", "lora_B")
            tensors[b.replace("to_q", "to_z")] = tensors.pop(b)
        elif kind == "nan":
            tensors[key] = torch.full_like(tensors[key], float("nan"))
        elif kind == "text-encoder":
            tensors["text_encoder.layer.0.q.lora_A.weight"] = tensors[key].clone()
        elif kind == "lone-b":
            del tensors[key]
        elif kind == "bad-alpha":
            header = {**header, "lora_adapter_metadata": json.dumps({"unet.lora_alpha": "big"})}
        save_file(tensors, path, metadata=header)
    return str(path)


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such file"), ("weight-not-a-number", "is not a number"), ("weight-inf", "finite"),
    ("garbage", "not a readable safetensors file"), ("model-weights", "not a LoRA in the diffusers/peft layout"),
    ("other-model", "trained for another model"), ("unknown-module", "has no projection"), ("nan", "NaN"),
    ("text-encoder", "U-Net adapters only"), ("lone-b", "has no lora_A partner"), ("bad-alpha", "lora_alpha"),
])
def test_generate_refuses_a_bad_lora_in_one_line(kind, message, tiny_diffusion_run, adapter_file, tmp_path, capsys):
    out = tmp_path / "out.png"
    spec = hostile(kind, adapter_file, tmp_path)
    assert main(["generate", "a red circle", "--model", str(tiny_diffusion_run), "--steps", "2", "--quiet",
                 "--lora", spec, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("carrara: error: --lora") and message in err[0], err
    assert not out.exists()


def test_a_bad_second_adapter_leaves_the_unet_untouched(tiny_diffusion_run, adapter_file, tmp_path):
    unet = Pipeline.load(tiny_diffusion_run, precision="fp32").unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(CarraraError, match="trained for another model"):
        apply_loras(unet, [str(adapter_file), hostile("other-model", adapter_file, tmp_path)])
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_merging_into_an_int8_unet_is_one_clear_refusal(tiny_diffusion_run):
    """Pipeline.merge_loras, which generate and serve both call: the int8 calibration is for the model's own weights."""
    pipe = Pipeline.load(tiny_diffusion_run, precision="fp32")
    pipe.precision = "int8"  # as Pipeline.load(precision="int8") leaves it; the refusal comes before any merge
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(CarraraError, match="--lora merges into fp32 weights"):
        pipe.merge_loras(["any.safetensors"])
    assert pipe.loras == [] and all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_lora_with_auto_precision_stays_out_of_int8(tiny_diffusion_run, adapter_file, tmp_path, monkeypatch):
    """Where "auto" would be int8 (no native bf16, a calibration beside the weights), --lora loads fp32 to merge into,
    in generate and serve, instead of refusing."""
    import shutil

    import carrara.serve.app as app_module

    model = tmp_path / "model"
    shutil.copytree(tiny_diffusion_run, model)
    (tmp_path / "p.txt").write_text("a red circle\n")
    assert main(["quantize", "--model", str(model), "--prompts", str(tmp_path / "p.txt"), "--n", "1"]) == 0
    monkeypatch.setenv("CARRARA_BF16", "0")
    assert Pipeline.load(model).precision == "int8"
    out = tmp_path / "lora.png"
    assert main(["generate", "a red circle", "--model", str(model), "--steps", "2", "--lora", str(adapter_file),
                 "-o", str(out), "--quiet"]) == 0
    assert read_png_metadata(out)["precision"] == "fp32" and read_png_metadata(out)["lora"][0]["weight"] == 1.0
    served = []
    monkeypatch.setattr(app_module, "server", lambda app: type("S", (), {"run": lambda self, sockets: served.append(
        app)})())
    assert main(["serve", "--model", str(model), "--port", "0", "--data-dir", str(tmp_path / "g"),
                 "--lora", str(adapter_file)]) == 0
    assert served[0].state.models.get().precision == "fp32"
