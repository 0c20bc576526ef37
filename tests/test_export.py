"""`carrara export default`: fp16 copy of a run, loadable as a model folder, within the size budget."""
import pytest
import torch
from safetensors.torch import load_file
from test_cli_generate import write_tiny_model

import carrara.modelfolder
from carrara.cli import build_parser, main
from carrara.errors import CarraraError
from carrara.export import export_default
from carrara.pipeline import Pipeline


def test_export_writes_fp16_weights_that_sample_like_the_run(tiny_diffusion_run, tmp_path):
    out = tmp_path / "default"
    result = export_default(tiny_diffusion_run, out)
    assert result["out"] == str(out)
    for part in ("unet", "vae"):
        tensors = load_file(str(out / part / "diffusion_pytorch_model.safetensors"))
        assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}
    assert (out / "training" / "diffusion" / "log.txt").is_file()
    kwargs = {"steps": 4, "sampler": "ddim", "guidance": 3.0, "seed": 5, "output": "tensor"}
    a = Pipeline.load(tiny_diffusion_run)(["a red circle"], **kwargs)
    b = Pipeline.load(out)(["a red circle"], **kwargs)
    diff = (a - b).abs().mean().item()
    assert diff < 2e-3, diff  # fp16 rounding of the weights only
    assert not list(tmp_path.glob(".export-*"))  # no temporary folder left behind


def test_export_over_budget_leaves_nothing(tiny_diffusion_run, tmp_path):
    with pytest.raises(CarraraError, match="MB budget"):
        export_default(tiny_diffusion_run, tmp_path / "default", max_mb=0.001)
    assert list(tmp_path.iterdir()) == []


def test_export_cli_bad_model_is_one_line(tmp_path, capsys):
    assert main(["export", "default", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_diffusers_loads_the_export_and_makes_the_same_image(tiny_diffusion_run, tmp_path):
    """Same initial latents, DDIM η = 0, guidance 3: diffusers' StableDiffusionPipeline on the exported folder
    and carrara's Pipeline on the run give the same pixels (mean abs diff ≤ 1/255)."""
    diffusers = pytest.importorskip("diffusers")
    import numpy as np

    from carrara.export import export_diffusers

    out = tmp_path / "sd"
    assert main(["export", "diffusers", "--model", str(tiny_diffusion_run), "--out", str(out)]) == 0
    pipe = Pipeline.load(tiny_diffusion_run, precision="fp32")  # diffusers runs fp32
    prompts, steps, guidance, seed = ["a large red circle on the left", "a small blue square"], 6, 3.0, 11
    ours = pipe(prompts, steps=steps, sampler="ddim", guidance=guidance, seed=seed, output="tensor")  # (2, 3, H, W)
    x_T = torch.cat([torch.randn(1, *pipe.latent_shape(), generator=torch.Generator().manual_seed(seed + i))
                     for i in range(len(prompts))])  # carrara's initial noise: one generator per image
    sd = diffusers.StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert isinstance(sd.scheduler, diffusers.DDIMScheduler)
    theirs = sd(prompts, num_inference_steps=steps, guidance_scale=guidance, eta=0.0, latents=x_T,
                output_type="np").images  # (2, H, W, 3) in [0, 1]
    ours_np = ((ours.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    diff = np.abs(ours_np - theirs).mean()
    assert diff <= 1 / 255, diff
    # and a different prompt gives a different image (the text reaches the U-Net through diffusers' encoder)
    other = sd(["a green star"] * 2, num_inference_steps=steps, guidance_scale=guidance, latents=x_T,
               output_type="np").images
    assert np.abs(other - theirs).mean() > 10 * diff
    with pytest.raises(CarraraError, match="not empty"):
        export_diffusers(tiny_diffusion_run, out)


def test_export_default_never_writes_into_the_package_unless_asked(tmp_path, monkeypatch, capsys):
    model = write_tiny_model(tmp_path / "model")
    package = tmp_path / "site-packages" / "carrara" / "assets"
    monkeypatch.setattr(carrara.modelfolder, "PACKAGED", package)
    with pytest.raises(SystemExit) as e:
        main(["export", "default", "--model", str(model)])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err
    assert not package.exists()
    with pytest.raises(SystemExit):
        main(["export", "default", "--model", str(model), "--out", str(tmp_path / "d"), "--into-package"])
    assert not package.exists() and not (tmp_path / "d").exists()
    assert main(["export", "default", "--model", str(model), "--into-package"]) == 0
    assert (package / "default" / "model_index.json").is_file()
    assert Pipeline.load(package / "default").model_hash  # a complete model folder


def test_export_into_package_shapes_is_loaded_by_name(tmp_path, monkeypatch, capsys):
    """`--into-package shapes` ships a second model under its name: Pipeline.load("shapes"), within its 20 MB."""
    model = write_tiny_model(tmp_path / "model")
    package = tmp_path / "site-packages" / "carrara" / "assets"
    monkeypatch.setattr(carrara.modelfolder, "PACKAGED", package)
    with pytest.raises(CarraraError, match="no shapes model is packaged"):
        Pipeline.load("shapes")
    monkeypatch.setitem(carrara.modelfolder.PACKAGED_BUDGET_MB, "shapes", 1e-4)
    assert main(["export", "default", "--model", str(model), "--into-package", "shapes"]) == 2
    assert "budget" in capsys.readouterr().err and not (package / "shapes").exists()
    monkeypatch.setitem(carrara.modelfolder.PACKAGED_BUDGET_MB, "shapes", 20.0)
    assert main(["export", "default", "--model", str(model), "--into-package", "shapes"]) == 0
    assert not (package / "default").exists()
    pipe = Pipeline.load("shapes")
    assert pipe.model_hash == Pipeline.load(package / "shapes").model_hash
    for name in carrara.modelfolder.PACKAGED_BUDGET_MB:  # the CLI offers every packaged name, and only those
        assert build_parser().parse_args(["export", "default", "--model", "m", "--into-package", name]).into_package \
            == name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "default", "--model", "m", "--into-package", "emoji"])


def test_export_default_refuses_a_folder_that_is_not_an_export(tiny_diffusion_run, tmp_path, capsys):
    """--out ~/projects must not replace a folder of the user's files; an earlier export is replaced."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", "default", "--model", str(tiny_diffusion_run), "--out", str(out)]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    assert main(["export", "default", "--model", str(tiny_diffusion_run), "--out", str(tmp_path / "new")]) == 0
    assert main(["export", "default", "--model", str(tiny_diffusion_run), "--out", str(tmp_path / "new")]) == 0
