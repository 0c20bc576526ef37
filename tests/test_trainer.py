"""The trainer core: loss goes down, resume is bitwise exact, checkpoints are atomic, bad losses stop."""
import json

import pytest
import torch
from PIL import Image

from carrara.errors import CarraraError
from carrara.train.checkpoint import latest_checkpoint, load_checkpoint
from carrara.train.core import EMA, TrainConfig, Trainer, batch_indices, step_generator

N = 96
X = torch.randn(N, 8, generator=torch.Generator().manual_seed(0))
W_TRUE = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
Y = X @ W_TRUE


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 3))


def loss_fn(model, idx, gen, rows):
    noise = 0.01 * torch.randn(len(idx), 3, generator=gen)[rows]  # the step's generator, like the real stages
    i = idx[rows]
    return ((model(X[i]) - Y[i] - noise) ** 2).mean()


def cfg(**kw) -> TrainConfig:
    base = {"steps": 40, "batch_size": 16, "lr": 1e-2, "warmup_steps": 5, "checkpoint_every": 10, "sample_every": 10**9,
                "log_every": 5, "bf16": False, "ema_decay": 0.9}
    return TrainConfig(**{**base, **kw})


def test_batch_indices_cover_each_epoch_once():
    seen = torch.cat([batch_indices(50, 10, 0, step) for step in range(5)])
    assert sorted(seen.tolist()) == list(range(50))
    assert not torch.equal(batch_indices(50, 10, 0, 0), batch_indices(50, 10, 1, 0))


def test_loss_goes_down(tmp_path):
    trainer = Trainer(tmp_path, make_model(), cfg(steps=150), n_examples=N, loss_fn=loss_fn)
    trainer.fit(progress=False)
    metrics = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < 0.1 * metrics[0]["loss"]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 150


def test_a_restarted_schedule_repeats_the_first_phase_exactly(tmp_path):
    """lr_restart = R: steps [0, R) get exactly the schedule of a run of R steps, steps [R, S) that of a run of S − R."""
    first = Trainer(tmp_path / "a", make_model(), cfg(steps=30), n_examples=N, loss_fn=loss_fn)
    second = Trainer(tmp_path / "b", make_model(), cfg(steps=10), n_examples=N, loss_fn=loss_fn)
    both = Trainer(tmp_path / "c", make_model(), cfg(steps=40, lr_restart=30), n_examples=N, loss_fn=loss_fn)
    assert [both.lr_at(s) for s in range(30)] == [first.lr_at(s) for s in range(30)]
    assert [both.lr_at(s) for s in range(30, 40)] == [second.lr_at(s) for s in range(10)]
    assert both.lr_at(30) == pytest.approx(1e-2 / 5) and first.lr_at(29) == pytest.approx(1e-3, rel=0.05)
    with pytest.raises(CarraraError, match="lr_restart"):
        cfg(steps=40, lr_restart=40).check()


def test_resume_is_bitwise_exact(tmp_path):
    full = Trainer(tmp_path / "full", make_model(), cfg(), n_examples=N, loss_fn=loss_fn)
    full.fit(progress=False)
    part = Trainer(tmp_path / "part", make_model(), cfg(), n_examples=N, loss_fn=loss_fn)
    part.fit(progress=False, stop_at=23)  # stops after a checkpoint at step 23, mid-way between the periodic ones
    resumed = Trainer(tmp_path / "part", make_model(), cfg(), n_examples=N, loss_fn=loss_fn)
    resumed.fit(resume=True, progress=False)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.model.state_dict().values(), resumed.ema.model.state_dict().values()):
        assert torch.equal(a, b)
    def losses(run):
        return [(m["step"], m["loss"]) for m in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]

    assert losses("part") == losses("full")


def test_resume_ignores_half_written_checkpoint(tmp_path):
    Trainer(tmp_path, make_model(), cfg(steps=20), n_examples=N, loss_fn=loss_fn).fit(progress=False)
    half = tmp_path / "checkpoints" / ".step_0000030.abcd"  # what a kill during a write leaves behind
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(tmp_path).name == "step_0000020"


def test_truncated_checkpoint_is_one_clear_error(tmp_path):
    trainer = Trainer(tmp_path, make_model(), cfg(steps=10), n_examples=N, loss_fn=loss_fn)
    trainer.fit(progress=False)
    ckpt = latest_checkpoint(tmp_path)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CarraraError, match="unreadable"):
        load_checkpoint(ckpt, model=trainer.model, ema=None, optimizer=trainer.optimizer)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CarraraError, match="no complete checkpoint"):
        Trainer(tmp_path, make_model(), cfg(), n_examples=N, loss_fn=loss_fn).fit(resume=True, progress=False)


def test_non_finite_losses_stop_with_a_checkpoint(tmp_path):
    def bad_loss(model, idx, gen, rows):
        return model(X[idx[rows]]).sum() * float("nan")

    with pytest.raises(CarraraError, match="non-finite"):
        Trainer(tmp_path, make_model(), cfg(max_bad_steps=3), n_examples=N, loss_fn=bad_loss).fit(progress=False)
    assert latest_checkpoint(tmp_path) is not None


def test_one_ema_update_matches_the_hand_computed_average_with_decay_warm_up():
    model = torch.nn.Linear(1, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(12.0)
    ema.update(model, step=0)  # warm-up: decay = min(0.999, (1 + 0) / (10 + 0)) = 0.1
    assert ema.model.weight.item() == pytest.approx(0.1 * 2.0 + 0.9 * 12.0, rel=1e-12)  # 11.0, not a copy (12)
    ema.update(model, step=90)  # decay = min(0.999, 91 / 100) = 0.91
    assert ema.model.weight.item() == pytest.approx(0.91 * 11.0 + 0.09 * 12.0, rel=1e-12)  # 11.09
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema.update(model, step=10**6)  # the warm-up is over: decay = 0.999
    assert ema.model.weight.item() == pytest.approx(0.999 * 11.09, rel=1e-12)
    assert model.weight.item() == 0.0  # the EMA never writes into the model it follows


def test_the_trainer_keeps_the_ema_of_its_weights(tmp_path):
    trainer = Trainer(tmp_path, make_model(), cfg(steps=1, ema_decay=0.9), n_examples=N, loss_fn=loss_fn)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit(progress=False)
    for w0, w1, e in zip(before, trainer.model.parameters(), trainer.ema.model.parameters()):
        expected = 0.1 * w0 + 0.9 * w1.detach()  # step 0: decay = min(0.9, 1 / 10)
        assert torch.allclose(e, expected, rtol=0, atol=1e-6)  # float32 lerp rounding
        assert not torch.allclose(e, w1, rtol=0, atol=1e-5)  # one Adam step moves each weight ~lr/5 = 2e-3


def test_the_bar_says_what_it_waits_for_at_100_percent(tmp_path, capsys):
    shown = {}

    def export_fn(ema):
        shown["export"] = capsys.readouterr().err.split("\r")[-1]  # the bar's frame while exporting

    def sample_fn(ema, step):
        shown["samples"] = capsys.readouterr().err.split("\r")[-1]
        return Image.new("RGB", (4, 4))

    Trainer(tmp_path, make_model(), cfg(steps=10), n_examples=N, loss_fn=loss_fn, sample_fn=sample_fn,
            export_fn=export_fn).fit(progress=True)
    assert "writing model folder" in shown["export"] and "100%" in shown["export"]
    assert "drawing samples" in shown["samples"] and "100%" in shown["samples"]
    assert "drawing samples" not in capsys.readouterr().err.split("\r")[-1]  # and says nothing once done


class Attention(torch.nn.Module):
    """A one-head self-attention over 4 tokens of width 2, then a linear head: the trainer's kernel choice shows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.out = torch.nn.Linear(2, 6), torch.nn.Linear(8, 3)

    def forward(self, x):  # (B, 8)
        q, k, v = self.qkv(x.reshape(-1, 1, 4, 2)).chunk(3, dim=-1)  # (B, 1, 4, 2) each
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v).flatten(1))


def test_bf16_training_on_cpu_takes_the_math_attention_kernel_with_the_same_losses(tmp_path, monkeypatch):
    """Under bf16 autocast on a CPU the trainer runs attention through the math kernel (the flash backward is slow
    there): the kernel it picks is the math one, and its losses equal those of PyTorch's default kernel within bf16
    rounding."""
    import contextlib

    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch._C._get_math_sdp_enabled() and not torch._C._get_flash_sdp_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    losses = {}
    for name, bf16 in (("bf16", True), ("fp32", False)):
        trainer = Trainer(tmp_path / name, Attention(), cfg(steps=8, bf16=bf16), n_examples=N, loss_fn=loss_fn)
        losses[name] = [trainer.step(s)[0] for s in range(8)]
    assert seen[:8] == [True] * 8 and seen[8:] == [False] * 8  # math under bf16 only
    default = Trainer(tmp_path / "default", Attention(), cfg(steps=8, bf16=True), n_examples=N, loss_fn=loss_fn)
    default._attention = contextlib.nullcontext  # PyTorch's own choice
    flash = [default.step(s)[0] for s in range(8)]
    assert losses["bf16"] == pytest.approx(flash, rel=2e-2)  # bf16 rounding of two kernel orders
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=5e-2)


def test_adam_moment_decays_are_settings(tmp_path):
    """train.beta1 / train.beta2 reach the optimiser (a GAN trains with β1 = 0); the defaults are torch's."""
    assert all(g["betas"] == (0.9, 0.999) for g in Trainer(tmp_path / "a", make_model(), cfg(), n_examples=N,
                                                            loss_fn=loss_fn).optimizer.param_groups)
    trainer = Trainer(tmp_path / "b", make_model(), cfg(beta1=0.0, beta2=0.9), n_examples=N, loss_fn=loss_fn)
    assert all(g["betas"] == (0.0, 0.9) for g in trainer.optimizer.param_groups)


def test_the_fused_optimizer_step_equals_the_reference_adamw(tmp_path):
    """The trainer's AdamW is the fused kernel; one step of it equals torch's per-tensor AdamW (same groups)."""
    trainer = Trainer(tmp_path, make_model(), cfg(), n_examples=N, loss_fn=loss_fn)
    assert all(g["fused"] for g in trainer.optimizer.param_groups)
    reference = make_model()
    decay = [p for p in reference.parameters() if p.ndim >= 2]
    no_decay = [p for p in reference.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=trainer.optimizer.param_groups[0]["lr"], foreach=False)
    trainer.step(0)
    loss_fn(reference, batch_indices(N, 16, 0, 0), step_generator(0, 0), trainer.rows[0]).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    opt.step()
    for ours, ref in zip(trainer.model.parameters(), reference.parameters()):
        assert torch.allclose(ours, ref, atol=1e-6)
