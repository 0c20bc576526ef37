"""Checkpoints that survive anything: SIGKILL mid-write, damaged files, every RNG, data position, NaN losses."""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from carrara.errors import CarraraError
from carrara.train.checkpoint import complete_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from carrara.train.core import TrainConfig, Trainer

N = 96
X = torch.randn(N, 8, generator=torch.Generator().manual_seed(0))
Y = X @ torch.randn(8, 3, generator=torch.Generator().manual_seed(1))


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 3))


def loss_fn(model, idx, gen, rows):
    noise = 0.01 * torch.randn(len(idx), 3, generator=gen)[rows]
    i = idx[rows]
    return ((model(X[i]) - Y[i] - noise) ** 2).mean()


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 30, "batch_size": 16, "lr": 1e-2, "warmup_steps": 5, "checkpoint_every": 10,
                          "sample_every": 10**9, "log_every": 5, "bf16": False, "ema_decay": 0.9, **kw})


def trainer(run: Path, **kw) -> Trainer:
    return Trainer(run, make_model(), cfg(**kw), n_examples=N, loss_fn=loss_fn)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Trainer:
    t = trainer(tmp_path_factory.mktemp("full"))
    t.fit(progress=False)
    return t


def assert_same_weights(a: Trainer, b: Trainer) -> None:
    for sa, sb in ((a.model.state_dict(), b.model.state_dict()), (a.ema.model.state_dict(), b.ema.model.state_dict())):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


KILLER = """
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import carrara.train.checkpoint as ckpt
import test_checkpoints as t

real = ckpt.save_file
def save_file(tensors, path):  # the checkpoint of step 20 dies half-way through its optimizer file
    real(tensors, path)
    if ".step_0000020." in str(path) and Path(path).name == "optimizer.safetensors":
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
ckpt.save_file = save_file
t.trainer(Path({run!r})).fit(progress=False)
"""


def test_sigkill_during_a_checkpoint_write_loses_nothing(full, tmp_path):
    run = tmp_path / "run"
    script = KILLER.format(tests=str(Path(__file__).parent), run=str(run))
    proc = subprocess.run([sys.executable, "-c", script], check=False, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    half = list((run / "checkpoints").glob(".step_0000020.*"))
    assert len(half) == 1 and (half[0] / "model.safetensors").is_file()  # the kill left a half-written folder
    assert latest_checkpoint(run).name == "step_0000010"  # which resume does not see
    resumed = trainer(run)
    resumed.fit(resume=True, progress=False)
    assert_same_weights(full, resumed)
    assert not list((run / "checkpoints").glob(".*"))  # the next save cleared the debris
    assert losses(run) == losses(full.run_dir)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_resume_falls_back_from_a_damaged_newest_checkpoint(full, tmp_path, capsys, damage):
    run = tmp_path / "run"
    trainer(run).fit(progress=False, stop_at=25)
    assert [p.name for p in complete_checkpoints(run)] == ["step_0000025", "step_0000020"]
    target = run / "checkpoints" / "step_0000025" / ("model.safetensors" if damage == "truncate" else "ema.safetensors")
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2:]
    else:
        data[-3] ^= 0x40  # inside the tensor data: safetensors itself would read it without complaint
    target.write_bytes(bytes(data))
    capsys.readouterr()
    resumed = trainer(run)
    resumed.fit(resume=True, progress=False)
    assert_same_weights(full, resumed)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "step_0000025" in warnings[0] and "falling back to step_0000020" in warnings[0]
    assert ("bytes" if damage == "truncate" else "SHA-256") in warnings[0]
    assert "resumed from step_0000020 at step 20" in (run / "log.txt").read_text()


STATE_DAMAGE = {  # valid JSON of the wrong shape, as a hand edit, a bad merge or a foreign tool leaves it
    "a list": lambda state: [],
    "step a string": lambda state: {**state, "step": "x"},
    "step of another checkpoint": lambda state: {**state, "step": 20},
    "no optimizer": lambda state: {k: v for k, v in state.items() if k != "optimizer"},
    "no param groups": lambda state: {**state, "optimizer": {"scalars": {}}},
    "data a list": lambda state: {**state, "data": []},
    "a file outside": lambda state: {**state, "files": {**state["files"], "../../state.json": {"bytes": 1, "sha256": ""}}},
    "rng damaged": lambda state: {**state, "rng": {"python": 5, "numpy": None}},
}


@pytest.mark.parametrize("damage", list(STATE_DAMAGE))
def test_resume_falls_back_from_a_newest_state_json_of_the_wrong_shape(full, tmp_path, capsys, damage):
    run = tmp_path / "run"
    trainer(run).fit(progress=False, stop_at=25)
    path = run / "checkpoints" / "step_0000025" / "state.json"
    path.write_text(json.dumps(STATE_DAMAGE[damage](json.loads(path.read_text()))))
    capsys.readouterr()
    resumed = trainer(run)
    resumed.fit(resume=True, progress=False)
    assert_same_weights(full, resumed)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "step_0000025 is unreadable" in warnings[0]
    assert "falling back to step_0000020" in warnings[0]
    assert "resumed from step_0000020 at step 20" in (run / "log.txt").read_text()


def test_every_damaged_checkpoint_is_one_clear_error(tmp_path):
    run = tmp_path / "run"
    trainer(run, steps=10, checkpoint_every=5).fit(progress=False)
    for ckpt in complete_checkpoints(run):
        (ckpt / "model.safetensors").write_bytes(b"")
    with pytest.raises(CarraraError, match="none of the 2 checkpoints .* reads back whole"):
        trainer(run, steps=10).fit(resume=True, progress=False)


def test_every_rng_is_saved_and_restored(tmp_path):
    t = trainer(tmp_path)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt = save_checkpoint(tmp_path, 1, model=t.model, ema=None, optimizer=t.optimizer, extra={})
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_checkpoint(ckpt, model=t.model, ema=None, optimizer=t.optimizer)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_data_position_is_recorded_and_changed_data_warns(tmp_path, capsys):
    trainer(tmp_path).fit(progress=False, stop_at=13)
    state = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())
    assert state["data"] == {"samples_seen": 13 * 16, "examples": N, "fingerprint": "", "epoch": 2, "offset": 16}
    capsys.readouterr()
    Trainer(tmp_path, make_model(), cfg(), n_examples=N - 1, loss_fn=loss_fn).fit(resume=True, progress=False)
    assert "the data changed since step_0000013 (96 → 95 examples)" in capsys.readouterr().err


def test_non_finite_losses_are_skipped_counted_and_stop_with_a_good_checkpoint(tmp_path, capsys):
    def sometimes_nan(model, idx, gen, rows):
        loss = loss_fn(model, idx, gen, rows)
        return loss * float("nan") if idx[0] % 5 == 0 else loss  # a few bad batches, never 3 in a row here

    t = Trainer(tmp_path / "some", make_model(), cfg(max_bad_steps=3), n_examples=N, loss_fn=sometimes_nan)
    bad = sum(int(t.batch_fn(s)[0]) % 5 == 0 for s in range(30))
    result = t.fit(progress=False)
    assert 0 < bad < 30 and result["skipped_steps"] == bad
    assert f"{bad} steps skipped for a non-finite loss" in capsys.readouterr().err
    assert all(torch.isfinite(p).all() for p in t.model.parameters())

    calls = []

    def nan_after_12(model, idx, gen, rows):
        calls.append(1)
        return loss_fn(model, idx, gen, rows) * (float("nan") if len(calls) > 12 else 1.0)

    t2 = Trainer(tmp_path / "stop", make_model(), cfg(max_bad_steps=3), n_examples=N, loss_fn=nan_after_12)
    with pytest.raises(CarraraError, match="3 non-finite losses in a row at step 14"):
        t2.fit(progress=False)
    assert latest_checkpoint(tmp_path / "stop").name == "step_0000014"
    check = trainer(tmp_path / "check")
    load_checkpoint(latest_checkpoint(tmp_path / "stop"), model=check.model, ema=check.ema.model,
                    optimizer=check.optimizer)
    assert all(torch.equal(a, b) for a, b in zip(check.model.parameters(), t2.model.parameters()))
    assert all(torch.isfinite(p).all() for p in check.model.parameters())


def ctrl_c_during(step: int, presses: int = 1):
    """A loss_fn that sends this process SIGINT `presses` times while computing `step` (its step+1-th call)."""
    calls = []

    def loss(model, idx, gen, rows):
        calls.append(1)
        if len(calls) == step + 1:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return loss_fn(model, idx, gen, rows)

    return loss


def test_ctrl_c_finishes_the_step_saves_it_and_resume_matches_an_uninterrupted_run(full, tmp_path, capsys):
    run, before = tmp_path / "run", signal.getsignal(signal.SIGINT)
    t = Trainer(run, make_model(), cfg(), n_examples=N, loss_fn=ctrl_c_during(12))
    with pytest.raises(KeyboardInterrupt):
        t.fit(progress=False)
    assert signal.getsignal(signal.SIGINT) is before  # the trainer's handler is gone again
    assert latest_checkpoint(run).name == "step_0000013"  # step 12 finished, then was saved: nothing lost
    assert "carrara: interrupted at step 13: checkpoint saved" in capsys.readouterr().err
    resumed = trainer(run)
    resumed.fit(resume=True, progress=False)
    assert_same_weights(full, resumed)
    assert losses(run) == losses(full.run_dir)
    assert "resumed from step_0000013 at step 13" in (run / "log.txt").read_text()


def test_a_second_ctrl_c_stops_at_once_and_leaves_the_last_checkpoint_whole(full, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(run, make_model(), cfg(), n_examples=N, loss_fn=ctrl_c_during(12, presses=2)).fit(progress=False)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000010"]
    resumed = trainer(run)
    resumed.fit(resume=True, progress=False)
    assert_same_weights(full, resumed)
