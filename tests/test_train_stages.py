"""Both training stages on a fixed tiny dataset: the loss goes down, resume is exact, runs are model folders."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_VAE, tiny_diffusion_recipe
from safetensors.torch import load_file

from carrara.errors import CarraraError
from carrara.pipeline import Pipeline
from carrara.recipe import apply_overrides
from carrara.train.checkpoint import latest_checkpoint
from carrara.train.diffusion import DiffusionRecipe, train_diffusion


def losses(run) -> list[float]:
    return [json.loads(s)["loss"] for s in (run / "metrics.jsonl").read_text().splitlines()]


def test_autoencoder_loss_goes_down_and_run_has_everything(tiny_ae_run):
    ae_run = tiny_ae_run
    curve = losses(ae_run)
    assert curve[-1] < 0.6 * curve[0]
    for name in ("config.json", "log.txt", "loss.png", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"):
        assert (ae_run / name).is_file(), name
    assert list((ae_run / "samples").glob("step_*.png"))
    scale = json.loads((ae_run / "vae" / "config.json").read_text())["scaling_factor"]
    assert 0.05 < scale < 20 and scale != 1.0  # measured 1/std of the latents, not the default


def test_diffusion_loss_goes_down_and_run_is_a_model_folder(tiny_diffusion_run):
    run = tiny_diffusion_run
    curve = losses(run)
    assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:3]) / 3
    pipe = Pipeline.load(run)
    images = pipe(["a red circle"], steps=3, seed=0)
    assert images[0].size == (16, 16)
    config = json.loads((run / "config.json").read_text())
    assert config["stage"] == "diffusion" and config["cond_dropout"] == 0.1


def test_diffusion_resume_gives_the_same_weights(tiny_shapes, tiny_ae_run, tmp_path):
    data, ae_run = tiny_shapes, tiny_ae_run
    full, part = tmp_path / "full", tmp_path / "part"
    train_diffusion(tiny_diffusion_recipe(data, ae_run), full, progress=False)
    train_diffusion(tiny_diffusion_recipe(data, ae_run), part, progress=False, stop_at=17)
    train_diffusion(tiny_diffusion_recipe(data, ae_run), part, progress=False, resume=True)
    a = load_file(full / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(part / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_diffusion_needs_a_trained_autoencoder(tiny_shapes, tmp_path):
    with pytest.raises(CarraraError, match="no trained autoencoder"):
        train_diffusion(DiffusionRecipe(data=str(tiny_shapes), autoencoder=str(tmp_path)), tmp_path / "run",
                        progress=False)


def test_overrides_reach_nested_fields_and_refuse_unknown_ones():
    recipe = apply_overrides(DiffusionRecipe(), ["train.steps=7", "train.lr=1e-3", "model.layers_per_block=1",
                                                 "cond_dropout=0.2"])
    assert recipe.train.steps == 7 and recipe.train.lr == 1e-3 and recipe.cond_dropout == 0.2
    assert recipe.model["layers_per_block"] == 1
    with pytest.raises(CarraraError, match="unknown setting"):
        apply_overrides(DiffusionRecipe(), ["train.nope=1"])
    with pytest.raises(CarraraError, match="expects int"):
        apply_overrides(DiffusionRecipe(), ["train.steps=many"])


def wait_for_progress(proc: subprocess.Popen, log, deadline: float) -> None:
    """Poll the run's log until it shows a logged step (or the process ends, or the deadline passes)."""
    while time.monotonic() < deadline:
        if log.is_file() and '"step"' in log.read_text():
            return
        try:
            proc.wait(timeout=0.05)  # the poll interval; returns early if the process died
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"training ended before it was interrupted: {proc.stderr.read()}")
    pytest.fail("no training step was logged before the deadline")


def test_ctrl_c_on_the_cli_saves_a_checkpoint_and_resume_continues_from_it(tiny_shapes, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "carrara", "train", "autoencoder", "--data", str(tiny_shapes), "--out", str(run),
            "--size", "16", "--batch-size", "8", "--quiet", "--set", "train.bf16=false", "--set",
            f"model={json.dumps(TINY_VAE)}", "--set", "train.log_every=1", "--set", "train.checkpoint_every=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*args, "--steps", "100000"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_progress(proc, run / "log.txt", time.monotonic() + 120)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    step = int(latest_checkpoint(run).name.removeprefix("step_"))
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert f"carrara: interrupted at step {step}: checkpoint saved" in err and step >= 1
    assert f'"step": {step - 1},' in (run / "log.txt").read_text()  # the checkpoint holds every logged step
    resumed = subprocess.run([*args, "--steps", str(step + 2), "--resume"], env=env, capture_output=True, text=True,
                             timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step_{step:07d} at step {step}" in (run / "log.txt").read_text()
