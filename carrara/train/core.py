"""The small trainer core shared by every stage: AdamW with warm-up, bf16 autocast, clipping, EMA,
progress bar, log, loss curve, sample grids and exactly resumable checkpoints.

Exact resume: every step draws its batch and its noise from a generator seeded by (seed, step), so
a resumed run replays the same randomness as an uninterrupted one without storing a data cursor.
"""
from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from carrara.errors import CarraraError
from carrara.io import save_image_atomic, write_json_atomic
from carrara.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX-512 BF16 or AMX), where autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class TrainConfig:
    """Optimisation settings shared by all stages (saved in every run's config.json)."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool | None = None  # None: on where the CPU supports it
    seed: int = 0
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 250
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops

    def use_bf16(self) -> bool:
        return cpu_supports_bf16() if self.bf16 is None else self.bf16


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for one step: a pure function of (seed, step), which makes resume exact."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of step's batch: epochs are seeded permutations of range(n), walked in order."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))
        out.extend(perm[offset:offset + batch_size - len(out)].tolist())
    return torch.tensor(out)


class EMA(torch.nn.Module):
    """Exponential moving average of a model's weights (used for sampling), with decay warm-up."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_params = [p for p in self.model.parameters()]
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def plot_loss(metrics: list[dict], path: Path, title: str) -> None:
    """Loss curve (raw and smoothed, log scale) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    loss = [m["loss"] for m in metrics]
    smooth, s = [], loss[0] if loss else 0.0
    for v in loss:
        s = 0.9 * s + 0.1 * v
        smooth.append(s)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=0.8, label="loss")
    ax.plot(steps, smooth, color="tab:blue", lw=1.5, label="smoothed")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


class Trainer:
    """Runs `loss_fn(model, batch_indices, generator) -> loss` for cfg.steps steps in `run_dir`."""

    def __init__(self, run_dir: Path, model: torch.nn.Module, cfg: TrainConfig, *, n_examples: int,
                 loss_fn: Callable, sample_fn: Callable | None = None, export_fn: Callable | None = None,
                 run_config: dict | None = None, name: str = "train", batch_fn: Callable | None = None):
        self.run_dir, self.model, self.cfg, self.name = Path(run_dir), model, cfg, name
        # batch_fn(step) -> indices; the default walks seeded epochs. Must be a pure function of step (exact resume).
        self.batch_fn = batch_fn or (lambda step: batch_indices(n_examples, cfg.batch_size, cfg.seed, step))
        self.n_examples, self.loss_fn, self.sample_fn, self.export_fn = n_examples, loss_fn, sample_fn, export_fn
        self.run_config = run_config or {}
        self.ema = EMA(model, cfg.ema_decay)
        decay, no_decay = [], []
        for p in model.parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))
        self.metrics: list[dict] = []

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10 % of the peak."""
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def _log(self, line: str) -> None:
        with open(self.run_dir / "log.txt", "a") as f:
            f.write(line + "\n")

    def _resume(self) -> int:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise CarraraError(f"--resume: no complete checkpoint in {self.run_dir}/checkpoints")
        state = load_checkpoint(ckpt, model=self.model, ema=self.ema.model, optimizer=self.optimizer)
        step = state["step"]
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            lines = [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
            self.metrics = [m for m in lines if m["step"] < step]
        self._write_metrics()
        self._log(f"resumed from {ckpt.name} at step {step}")
        return step

    def _write_metrics(self) -> None:
        text = "".join(json.dumps(m) + "\n" for m in self.metrics)
        (self.run_dir / ".metrics.jsonl.tmp").write_text(text)
        (self.run_dir / ".metrics.jsonl.tmp").replace(self.run_dir / "metrics.jsonl")

    def _checkpoint(self, step: int) -> None:
        save_checkpoint(self.run_dir, step, model=self.model, ema=self.ema.model, optimizer=self.optimizer,
                        extra={"config": self.run_config})
        if self.export_fn is not None:
            self.export_fn(self.ema.model)
        self._write_metrics()
        if self.metrics:
            plot_loss(self.metrics, self.run_dir / "loss.png", f"{self.name} loss")

    def _samples(self, step: int) -> None:
        if self.sample_fn is None:
            return
        (self.run_dir / "samples").mkdir(exist_ok=True)
        image = self.sample_fn(self.ema.model, step)
        save_image_atomic(self.run_dir / "samples" / f"step_{step:07d}.png", image)

    def fit(self, *, resume: bool = False, progress: bool = True, stop_at: int | None = None) -> dict:
        """Train to cfg.steps (from the newest checkpoint when resume), checkpointing on the way.

        `stop_at` ends the run early at that step, as if it had been killed right after a checkpoint."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / "config.json", {**self.run_config, "train": asdict(cfg)})
        start = self._resume() if resume else 0
        if not resume:
            (self.run_dir / "log.txt").write_text("")
        bf16 = cfg.use_bf16()
        self._log(f"{self.name}: steps {start}->{cfg.steps}, batch {cfg.batch_size}, bf16 {bf16}, "
                  f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params, {self.n_examples} examples")
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=start, desc=self.name, disable=not progress, dynamic_ncols=True)
        bad, t_last, n_last = 0, time.perf_counter(), 0
        for step in range(start, min(cfg.steps, stop_at or cfg.steps)):
            lr = self.lr_at(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            gen = step_generator(cfg.seed, step)
            idx = self.batch_fn(step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = self.loss_fn(self.model, idx, gen)
            if not torch.isfinite(loss):
                bad += 1
                self._log(f"step {step}: non-finite loss {loss.item()}, step skipped")
                if bad >= cfg.max_bad_steps:
                    self._checkpoint(step)
                    raise CarraraError(f"{bad} non-finite losses in a row at step {step}; last good weights "
                                       f"are in {self.run_dir}/checkpoints — lower --set lr or check the data")
                continue
            bad = 0
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.ema.update(self.model, step)
            n_last += cfg.batch_size
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                now = time.perf_counter()
                rate = n_last / (now - t_last)
                t_last, n_last = now, 0
                m = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(), "samples_per_s": rate}
                self.metrics.append(m)
                bar.set_postfix(loss=f"{m['loss']:.4f}", sps=f"{rate:.0f}")
                self._log(json.dumps(m))
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 in (cfg.steps, stop_at):
                self._checkpoint(step + 1)
            if (step + 1) % cfg.sample_every == 0 or step + 1 == cfg.steps:
                self._samples(step + 1)
        bar.close()
        if start >= cfg.steps:
            self._checkpoint(cfg.steps)
        last = self.metrics[-1]["loss"] if self.metrics else float("nan")
        self._log(f"done at step {cfg.steps}, last loss {last:.5f}")
        return {"steps": cfg.steps, "last_loss": last}
