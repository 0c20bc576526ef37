"""The small trainer core shared by every stage: AdamW with warm-up, mixed precision, clipping, EMA,
gradient accumulation, data parallelism, progress bar, log, loss curve, sample grids and exactly
resumable checkpoints.

Exact resume: every step draws its batch and its noise from a generator seeded by (seed, step), so
a resumed run replays the same randomness as an uninterrupted one; the data position stored in each
checkpoint is a record (and a check that the data did not change), not what resume depends on.

Batch B is shared out by rows, never by re-drawing: a loss function gets the global batch's indices
`idx` (B,), the step's generator, and `rows`, the slice it must compute (this rank's share, one
accumulation micro-batch). It draws its random numbers for all B examples and keeps [rows], so N
processes × K micro-batches see exactly the numbers one process with batch B sees (train/distributed.py).

Ctrl-C (SIGINT) never interrupts a step half-way: it lets the step finish, saves a checkpoint and ends the run
with KeyboardInterrupt, so `--resume` continues exactly where it stopped; a second Ctrl-C stops at once.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from carrara.data.folder import describe, fingerprint
from carrara.errors import CarraraError
from carrara.fileio import save_image_atomic, write_json_atomic, write_text_atomic
from carrara.hardware import cpu_supports_bf16, keep_freed_memory
from carrara.train import distributed
from carrara.train.checkpoint import load_latest, save_checkpoint
from carrara.train.plots import plot_loss

MAX_BATCH_SIZE = 65536  # examples a step: far above a CPU run's, far below an allocation that stops the machine
AT_LEAST_ONE = ("steps", "batch_size", "grad_accum", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
                "max_bad_steps")


@dataclass
class TrainConfig:
    """Optimisation settings shared by all stages (saved in every run's config.json)."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.01
    beta1: float = 0.9  # Adam's moment decays; GANs train with β1 = 0 (SNGAN, BigGAN: families/gan.py)
    beta2: float = 0.999
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool | None = None  # None: on where the CPU supports it
    seed: int = 0
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 250
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops
    grad_accum: int = 1  # micro-batches per step: batch_size / (processes × grad_accum) examples each
    fp16: bool = False  # CUDA only: fp16 autocast with a GradScaler, for GPUs without bf16
    keep_checkpoints: int = 2
    lr_restart: int = 0  # a step where the schedule starts again from warm-up (a new phase of the run); 0: none

    def check(self) -> None:
        """One line for a setting the optimiser or the loop would crash on (lr < 0, a step count of 0) or that trains
        nonsense (an EMA decay above 1), before any data is read."""
        for name in AT_LEAST_ONE:
            if not getattr(self, name) >= 1:
                raise CarraraError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size > MAX_BATCH_SIZE:
            raise CarraraError(f"train.batch_size={self.batch_size} is too large (at most {MAX_BATCH_SIZE})")
        for name in ("lr", "weight_decay"):
            if not 0.0 <= getattr(self, name) < math.inf:
                raise CarraraError(f"train.{name} must be a finite number ≥ 0, got {getattr(self, name)}")
        if not self.warmup_steps >= 0 or not self.grad_clip > 0:
            raise CarraraError(f"need train.warmup_steps ≥ 0 and train.grad_clip > 0, got {self.warmup_steps} and "
                               f"{self.grad_clip}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise CarraraError(f"train.beta1 and train.beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise CarraraError(f"train.ema_decay must be between 0 and 1, got {self.ema_decay}")
        if not 0 <= self.lr_restart < self.steps:
            raise CarraraError(f"train.lr_restart must be in [0, steps), got {self.lr_restart}")

    def use_bf16(self) -> bool:
        return cpu_supports_bf16() if self.bf16 is None else self.bf16

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """bf16 on CPUs that have it and on GPUs that have it; fp16 on GPUs when asked; else None (fp32)."""
        if device.type != "cuda":
            if self.fp16:
                raise CarraraError("train.fp16 needs a GPU; on CPU use bf16 (train.bf16=true)")
            return torch.bfloat16 if self.use_bf16() else None
        if self.fp16:
            return torch.float16
        bf16 = torch.cuda.is_bf16_supported() if self.bf16 is None else self.bf16
        return torch.bfloat16 if bf16 else None


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


class Interrupt:
    """SIGINT while training: the first asks the loop to stop after the current step, a second stops at once."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self):
        """Catch SIGINT in the main thread for the duration; a SIGINT that is ignored (nohup) stays ignored."""
        previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
        if previous in (None, signal.SIG_IGN):  # another thread, or a handler not set from Python
            yield self
            return
        signal.signal(signal.SIGINT, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


class Trainer:
    """Runs `loss_fn(model, idx, gen, rows) -> loss` for cfg.steps steps in `run_dir` (see the module docstring).

    `data_report` ({"skipped": {reason: count}, ...}) is logged at the start and the end of the run;
    `data_fingerprint` names the dataset, so resuming on different data warns instead of silently mixing.
    """

    def __init__(self, run_dir: Path, model: torch.nn.Module, cfg: TrainConfig, *, n_examples: int,
                 loss_fn: Callable, sample_fn: Callable | None = None, export_fn: Callable | None = None,
                 run_config: dict | None = None, name: str = "train", batch_fn: Callable | None = None,
                 data_report: dict | None = None, data_fingerprint: str = ""):
        cfg.check()
        self.run_dir, self.cfg, self.name = Path(run_dir), cfg, name
        self.current_step = 0
        self.ctx = distributed.setup()
        self.model = model.to(self.ctx.device)
        # batch_fn(step) -> indices; the default walks seeded epochs. Must be a pure function of step (exact resume).
        self.batch_fn = batch_fn or (lambda step: batch_indices(n_examples, cfg.batch_size, cfg.seed, step))
        self.epochs = batch_fn is None  # the default walks epochs: the data position has an epoch and an offset
        self.n_examples, self.loss_fn, self.sample_fn, self.export_fn = n_examples, loss_fn, sample_fn, export_fn
        self.run_config = run_config or {}
        self.data_report, self.data_fingerprint = data_report or {}, data_fingerprint
        self.rows = distributed.rank_rows(cfg.batch_size, self.ctx, cfg.grad_accum)
        self.dtype = cfg.autocast_dtype(self.ctx.device)
        self.ema = EMA(model, cfg.ema_decay)
        decay, no_decay = [], []
        for p in model.parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        # fused: one kernel over all parameters (the default U-Net's step: 12 ms instead of 39 ms, AMD Zen 5)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2),
                                           fused=self.ctx.device.type in ("cpu", "cuda"))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype is torch.float16)
        self.forward = distributed.wrap(self.model, loss_fn, self.ctx)
        self.metrics: list[dict] = []
        self.bar: tqdm | None = None
        self.shown = ""  # the status the bar shows besides its name
        self.saved_step: int | None = None  # the step of the newest checkpoint this run wrote or resumed from

    @classmethod
    def for_stage(cls, stage: str, recipe, out: Path, model: torch.nn.Module, *, records: list, report: dict,
                  name: str | None = None, **kwargs) -> Trainer:
        """The trainer of one stage: its recipe (a dataclass with `.train`) is the run's config.json, and the records'
        fingerprint names its data, so a resume on other data warns."""
        return cls(out, model, recipe.train, run_config={"stage": stage, **asdict(recipe)}, name=name or stage,
                   data_report=report, data_fingerprint=fingerprint(records), **kwargs)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10 % of the peak; with lr_restart, once over [0, lr_restart) and again
        over [lr_restart, steps) (a warm restart, Loshchilov & Hutter 2017: a run continued into a new phase
        decays exactly as it did when the first phase was the whole run)."""
        cfg = self.cfg
        end = cfg.lr_restart if 0 < cfg.lr_restart and step < cfg.lr_restart else cfg.steps
        if 0 < cfg.lr_restart <= step:
            step -= cfg.lr_restart
            end -= cfg.lr_restart
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def log(self, line: str) -> None:
        if self.ctx.main:
            with open(self.run_dir / "log.txt", "a") as f:
                f.write(line + "\n")

    def _warn(self, line: str) -> None:
        if self.ctx.main:
            print(f"carrara: warning: {line}", file=sys.stderr)
        self.log(f"warning: {line}")

    def data_position(self, step: int) -> dict:
        """Where the data stream is before `step`: samples drawn so far and, for epoch walks, epoch and offset."""
        seen = step * self.cfg.batch_size
        position = {"samples_seen": seen, "examples": self.n_examples, "fingerprint": self.data_fingerprint}
        if self.epochs:
            position["epoch"], position["offset"] = divmod(seen, self.n_examples)
        return position

    def _resume(self) -> int:
        ckpt, state = load_latest(self.run_dir, warn=self._warn, model=self.model, ema=self.ema.model,
                                  optimizer=self.optimizer)
        step = state["step"]
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        was = state.get("data", {})
        if was and (was.get("examples"), was.get("fingerprint")) != (self.n_examples, self.data_fingerprint):
            what = (f"{was.get('examples')} → {self.n_examples} examples" if was.get("examples") != self.n_examples
                    else "other files or captions")
            self._warn(f"the data changed since {ckpt.name} ({what}): training continues, "
                       "but not as an exact replay of the interrupted run")
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            lines = [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
            self.metrics = [m for m in lines if m["step"] < step]
        self._write_metrics()
        self.log(f"resumed from {ckpt.name} at step {step}")
        self.saved_step = step
        return step

    def _write_metrics(self) -> None:
        if self.ctx.main:
            write_text_atomic(self.run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics))

    def _status(self, what: str = "") -> None:
        """Name on the bar the work it waits for (checkpoint, export, samples): at 100 % it would look hung."""
        if self.bar is not None and what != self.shown:
            self.shown = what
            self.bar.set_description(f"{self.name} ({what})" if what else self.name)

    def _checkpoint(self, step: int) -> None:
        self.saved_step = step
        if not self.ctx.main:
            return
        extra = {"config": self.run_config, "data": self.data_position(step)}
        if self.scaler.is_enabled():
            extra["scaler"] = self.scaler.state_dict()
        self._status("saving checkpoint…")
        save_checkpoint(self.run_dir, step, model=self.model, ema=self.ema.model, optimizer=self.optimizer,
                        extra=extra, keep=self.cfg.keep_checkpoints)
        if self.export_fn is not None:
            self._status("writing model folder…")
            self.export_fn(self._ema_on_cpu())
        self._write_metrics()
        if self.metrics:
            plot_loss(self.metrics, self.run_dir / "loss.png", f"{self.name} loss")

    def _ema_on_cpu(self) -> torch.nn.Module:
        """The EMA model for sampling and export, which run on the CPU beside the stages' cached tensors."""
        return self.ema.model if self.ctx.device.type == "cpu" else copy.deepcopy(self.ema.model).cpu()

    def _samples(self, step: int) -> None:
        if self.sample_fn is None or not self.ctx.main:
            return
        (self.run_dir / "samples").mkdir(exist_ok=True)
        self._status("drawing samples…")
        image = self.sample_fn(self._ema_on_cpu(), step)
        save_image_atomic(self.run_dir / "samples" / f"step_{step:07d}.png", image)

    def _data_line(self) -> str:
        return f"data: {self.data_report.get('source', '')}: {describe(self.data_report) or 'every example usable'}"

    def step(self, step: int) -> tuple[float, torch.Tensor | None]:
        """One optimizer step on the global batch; returns (global mean loss, grad norm or None if skipped)."""
        cfg, accum = self.cfg, len(self.rows)
        self.current_step = step  # for a loss that changes over the run (train/upsampler.py's degrade_from)
        idx = self.batch_fn(step)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for k, rows in enumerate(self.rows):
            # DDP all-reduces on the last micro-batch only (its no_sync() docs: accumulate locally, sync once).
            last = k == accum - 1
            sync = contextlib.nullcontext() if last or self.ctx.world_size == 1 else self.forward.no_sync()
            with sync:
                with torch.autocast(self.ctx.device.type, dtype=self.dtype or torch.bfloat16,
                                    enabled=self.dtype is not None), self._attention():
                    loss = self.forward(idx, step_generator(cfg.seed, step), rows)
                self.scaler.scale(loss / accum if accum > 1 else loss).backward()
            total += loss.detach().double().cpu()
        loss_value = float(distributed.all_mean(total / accum, self.ctx))  # the same number on every rank
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():  # fp16 overflow: back off the loss scale as GradScaler would
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
            return loss_value, None
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ctx.main:  # only rank 0 samples and saves, so only it needs the EMA
            self.ema.update(self.model, step)
        return loss_value, grad_norm

    def _attention(self):
        """The attention kernel for training: on a CPU under bf16 autocast, the plain (math) one — PyTorch's CPU
        flash-attention backward is ~10× its forward in bf16, and the math path made the default U-Net's batch-64
        forward + backward 1.37× faster (1,010 → 737 ms, AMD Zen 5, docs/performance.md); elsewhere PyTorch's choice."""
        if self.ctx.device.type == "cpu" and self.dtype is torch.bfloat16:
            return sdpa_kernel(SDPBackend.MATH)
        return contextlib.nullcontext()

    def _stop(self, interrupt: Interrupt, step: int) -> None:
        """After a Ctrl-C on any rank: save the finished steps (unless just saved), then end the run."""
        if not bool(distributed.all_mean(torch.tensor(float(interrupt.requested)), self.ctx) > 0):
            return
        if self.saved_step != step:
            self._checkpoint(step)
        distributed.barrier(self.ctx)  # no rank exits (and makes torchrun stop the others) before the save
        self.bar.close()
        self.log(f"interrupted at step {step}: checkpoint saved")
        if self.ctx.main:
            print(f"carrara: interrupted at step {step}: checkpoint saved in {self.run_dir / 'checkpoints'}; "
                  "continue with --resume", file=sys.stderr)
        raise KeyboardInterrupt

    def fit(self, *, resume: bool = False, progress: bool = True, stop_at: int | None = None) -> dict:
        """Train to cfg.steps (from the newest checkpoint when resume), checkpointing on the way.

        `stop_at` ends the run early at that step, as if it had been killed right after a checkpoint."""
        cfg, ctx = self.cfg, self.ctx
        keep_freed_memory()
        if ctx.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.run_dir / "config.json", {**self.run_config, "train": asdict(cfg)})
            if not resume:
                (self.run_dir / "log.txt").write_text("")
        start = self._resume() if resume else 0
        distributed.barrier(ctx)  # every rank has read the checkpoint before rank 0 may replace or prune it
        self.log(f"{self.name}: steps {start}->{cfg.steps}, batch {cfg.batch_size} = {ctx.world_size} processes × "
                  f"{cfg.grad_accum} micro-batches × {cfg.batch_size // (ctx.world_size * cfg.grad_accum)}, "
                  f"{ctx.device.type} {str(self.dtype).removeprefix('torch.') if self.dtype else 'fp32'}, "
                  f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params, {self.n_examples} examples")
        self.log(self._data_line())
        self.model.train()
        self.bar = bar = tqdm(total=cfg.steps, initial=start, desc=self.name, disable=not (progress and ctx.main),
                              dynamic_ncols=True)
        with Interrupt().installed() as interrupt:
            n_bad = self._loop(start, stop_at, interrupt)
        bar.close()
        if start >= cfg.steps:
            self._checkpoint(cfg.steps)
        last = self.metrics[-1]["loss"] if self.metrics else float("nan")
        if n_bad:
            self._warn(f"{n_bad} steps skipped for a non-finite loss (see {self.run_dir / 'log.txt'})")
        self.log(self._data_line())
        self.log(f"done at step {min(cfg.steps, stop_at or cfg.steps)}, last loss {last:.5f}")
        return {"steps": cfg.steps, "last_loss": last, "skipped_steps": n_bad,
                "skipped": dict(self.data_report.get("skipped") or {}),
                "converted": dict(self.data_report.get("converted") or {})}

    def _loop(self, start: int, stop_at: int | None, interrupt: Interrupt) -> int:
        """The steps from `start`, with their logs, checkpoints and samples; returns how many were skipped."""
        cfg, bar = self.cfg, self.bar
        bad, n_bad, t_last, n_last = 0, 0, time.perf_counter(), 0
        for step in range(start, min(cfg.steps, stop_at or cfg.steps)):
            self._stop(interrupt, step)
            lr = self.lr_at(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = self.step(step)
            if grad_norm is None:
                bad, n_bad = bad + 1, n_bad + 1
                self.log(f"step {step}: non-finite loss {loss}, step skipped")
                if bad >= cfg.max_bad_steps:
                    self._checkpoint(step)
                    raise CarraraError(f"{bad} non-finite losses in a row at step {step}; last good weights "
                                       f"are in {self.run_dir}/checkpoints — lower --set train.lr or check the data")
                continue
            bad = 0
            n_last += cfg.batch_size
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                now = time.perf_counter()
                rate = n_last / (now - t_last)
                t_last, n_last = now, 0
                m = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(), "samples_per_s": rate}
                self.metrics.append(m)
                bar.set_postfix(loss=f"{m['loss']:.4f}", sps=f"{rate:.0f}")
                self.log(json.dumps(m))
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 in (cfg.steps, stop_at):
                self._checkpoint(step + 1)
            if (step + 1) % cfg.sample_every == 0 or step + 1 == cfg.steps:
                self._samples(step + 1)
            self._status()
        return n_bad
