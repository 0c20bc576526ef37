"""Data parallelism: N gloo processes × K micro-batches train the same weights as one process with the same batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed import TCPStore

from carrara.errors import CarraraError
from carrara.train import distributed
from carrara.train.autoencoder import AutoencoderRecipe
from carrara.train.checkpoint import latest_checkpoint
from carrara.train.core import TrainConfig, Trainer

N = 64
X = torch.randn(N, 8, generator=torch.Generator().manual_seed(0))
Y = X @ torch.randn(8, 3, generator=torch.Generator().manual_seed(1))


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.SiLU(), torch.nn.Linear(32, 3))


def loss_fn(model, idx, gen, rows):
    noise = 0.1 * torch.randn(len(idx), 3, generator=gen)[rows]  # drawn for the whole batch, then this call's rows
    i = idx[rows]
    return ((model(X[i]) - Y[i] - noise) ** 2).mean()


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 12, "batch_size": 16, "lr": 1e-2, "warmup_steps": 2, "checkpoint_every": 100,
                          "sample_every": 10**9, "log_every": 3, "bf16": False, "ema_decay": 0.9, **kw})


TINY_AE = json.dumps({"block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4,
                      "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2})


def _worker(rank: int, world: int, port: int, run_dir: str, grad_accum: int) -> None:
    # The parent hosts the rendezvous store (as torchrun's agent does): every rank connects to it as a client.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    Trainer(Path(run_dir), make_model(), cfg(grad_accum=grad_accum), n_examples=N, loss_fn=loss_fn).fit(progress=False)
    distributed.shutdown()


def spawn_two(run_dir: Path, grad_accum: int) -> None:
    """Two gloo processes on a store the OS gave a free port to while binding it: no bind-release-rebind race."""
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mp.spawn(_worker, args=(2, store.port, str(run_dir), grad_accum), nprocs=2)


def assert_trained_alike(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, steps: int, lr: float) -> None:
    """Two runs that differ only in float summation order end with the same weights, to rounding.

    The tolerance comes from the arithmetic. Splitting a batch over processes or micro-batches sums each gradient
    element in another order: it changes by rounding, ~n·ε·Σ|terms| over n terms (fp32 ε = 1.2e-7). AdamW
    divides the step by √v̂, so every weight moves ~lr per step whatever its gradient's size, and the rounding
    moves it by ~lr·|Δg|/|g|: a few ε of a step for most weights, but up to a sizeable part of a step for the
    rare weight whose gradient nearly cancels (|g| ~ |Δg|: in the torchrun test on an AVX2 CPU, one weight in
    15,000 moved 1.4 % of steps·lr, 1.6e-5, where a fixed 1e-5 had held on AVX-512). So the bound is on the
    bulk, in units of steps·lr: the mean |Δ| under 1e-3 and the 99th percentile under 1e-4 of it (measured: ~3e-8
    and ~3e-7 here, ~3e-6 and ~6e-6 in the torchrun test) — while a process stepping on half the batch, as ranks
    that skip the gradient all-reduce do, differs by 0.09–0.2 in the mean and 0.3–1 at the 99th percentile.
    """
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    scale = steps * lr  # ≥ Σ lr_t: how far AdamW can move a weight in `steps` steps, in units of its ~lr step
    assert diff.mean() < 1e-3 * scale and diff.quantile(0.99) < 1e-4 * scale, \
        (diff.mean().item() / scale, diff.quantile(0.99).item() / scale, diff.max().item() / scale)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run_dir) / "model.safetensors")


def losses(run_dir: Path) -> list[float]:
    return [json.loads(s)["loss"] for s in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = tmp_path_factory.mktemp("single")
    Trainer(run, make_model(), cfg(), n_examples=N, loss_fn=loss_fn).fit(progress=False)
    return run


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_gloo_processes_equal_one_process(single, tmp_path, grad_accum):
    spawn_two(tmp_path, grad_accum)
    a, b = weights(single), weights(tmp_path)
    start = make_model().state_dict()
    assert_trained_alike(a, b, steps=cfg().steps, lr=cfg().lr)
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-2  # the runs did train
    # a logged loss is a mean of 16 squares, summed in another order, of nearly the same weights: ~16 ε relative
    assert losses(tmp_path) == pytest.approx(losses(single), rel=1e-5)
    log = (tmp_path / "log.txt").read_text()
    assert log.count("steps 0->12") == 1  # only rank 0 writes: one header, not two
    assert f"batch 16 = 2 processes × {grad_accum} micro-batches × {8 // grad_accum}" in log


def test_gradient_accumulation_equals_the_whole_batch(single, tmp_path):
    trainer = Trainer(tmp_path, make_model(), cfg(grad_accum=4), n_examples=N, loss_fn=loss_fn)
    trainer.fit(progress=False)
    a, b = weights(single), trainer.model.state_dict()
    assert_trained_alike(a, b, steps=cfg().steps, lr=cfg().lr)


def test_rank_rows_split_the_batch_evenly():
    ctx = distributed.Context(rank=1, world_size=2, device=torch.device("cpu"))
    assert distributed.rank_rows(16, ctx, 2) == [slice(8, 12), slice(12, 16)]
    with pytest.raises(CarraraError, match="divisible"):
        distributed.rank_rows(10, ctx, 2)


def test_torchrun_runs_the_unchanged_cli(tiny_shapes, tmp_path):
    """`torchrun --nproc_per_node 2 -m carrara train …` gives the weights of the same command in one process."""
    args = ["-m", "carrara", "train", "autoencoder", "--data", str(tiny_shapes), "--size", "16", "--steps", "3",
            "--batch-size", "8", "--quiet", "--set", "train.bf16=false", "--set", "train.warmup_steps=1",
            "--set", f"model={TINY_AE}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300,
                         check=False)  # --standalone: torchrun's own rendezvous on a port it picks
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("autoencoder run in") == 1  # rank 0 prints the summary, rank 1 stays quiet
    assert "batch 8 = 2 processes × 1 micro-batches × 4" in (tmp_path / "two" / "log.txt").read_text()
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert_trained_alike(a, b, steps=3, lr=AutoencoderRecipe().train.lr)
