"""Data parallelism: N gloo processes × K micro-batches train the same weights as one process with the same batch."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from carrara.errors import CarraraError
from carrara.train import distributed
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, run_dir: str, grad_accum: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    Trainer(Path(run_dir), make_model(), cfg(grad_accum=grad_accum), n_examples=N, loss_fn=loss_fn).fit(progress=False)
    distributed.shutdown()


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
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), grad_accum), nprocs=2)
    a, b = weights(single), weights(tmp_path)
    start = make_model().state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-2  # the runs did train
    assert losses(tmp_path) == pytest.approx(losses(single), rel=1e-5)
    log = (tmp_path / "log.txt").read_text()
    assert log.count("steps 0->12") == 1  # only rank 0 writes: one header, not two
    assert f"batch 16 = 2 processes × {grad_accum} micro-batches × {8 // grad_accum}" in log


def test_gradient_accumulation_equals_the_whole_batch(single, tmp_path):
    trainer = Trainer(tmp_path, make_model(), cfg(grad_accum=4), n_examples=N, loss_fn=loss_fn)
    trainer.fit(progress=False)
    a, b = weights(single), trainer.model.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


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
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("autoencoder run in") == 1  # rank 0 prints the summary, rank 1 stays quiet
    assert "batch 8 = 2 processes × 1 micro-batches × 4" in (tmp_path / "two" / "log.txt").read_text()
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
