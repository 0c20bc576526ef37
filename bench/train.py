"""Diffusion-stage training speed: carrara's Trainer step vs a plain loop around diffusers' UNet2DConditionModel.

Same U-Net config (the model's unet/config.json; default: the packaged model's), same batch, same cached data
(latents (N, 4, 16, 16) and MiniLM-shaped text states (N, 64, 384), random), same AdamW. carrara's step is the
real one (`Trainer.step`: Algorithm 1, conditioning dropout, bf16 autocast where the CPU has native bf16,
gradient clipping, EMA). The plain loop is what diffusers' train_text_to_image.py does with its default
`--mixed_precision no`: fp32 forward, MSE to ε, backward, clip, AdamW step. A third timing, diffusers' U-Net
under the same bf16 autocast, separates carrara's share from bf16's. Interleaved rounds; medians.

    python bench/train.py [--model default] [--batch 64] [--rounds 5] [--steps-per-round 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from carrara.diffusion.objectives import diffusion_loss, sample_t_and_noise
from carrara.diffusion.schedule import NoiseSchedule
from carrara.fileio import write_json_atomic
from carrara.modelfolder import resolve
from carrara.models.config import UNetConfig
from carrara.models.unet import UNet2DConditionModel
from carrara.train.core import TrainConfig, Trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--out", default="bench/results/train.json")
    args = p.parse_args()
    import diffusers

    config = json.loads((resolve(args.model).unet / "config.json").read_text())
    n, B = 4 * args.batch, args.batch
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, config["in_channels"], config["sample_size"], config["sample_size"], generator=g)
    states = torch.randn(n, 64, config["cross_attention_dim"], generator=g)  # (N, L, D)
    # a U-Net conditioned on the pooled text embedding too (v2) takes it as class labels: (N, P)
    pooled = (torch.randn(n, config["projection_class_embeddings_input_dim"], generator=g)
              if config.get("class_embed_type") == "projection" else None)
    schedule = NoiseSchedule.from_config("scaled_linear", T=1000)

    # carrara: the real Trainer step (what `carrara train diffusion` runs), on the cached tensors
    def loss_fn(model, idx, gen, rows):
        x0 = latents[idx][rows]
        t, noise = sample_t_and_noise(x0, schedule, gen)
        drop = torch.rand(len(x0), generator=gen) < 0.1
        cond = torch.where(drop[:, None, None], 0.0, states[idx][rows])
        labels = None if pooled is None else torch.where(drop[:, None], 0.0, pooled[idx][rows])
        return diffusion_loss(lambda x, t: model(x, t, cond, class_labels=labels), x0, t, noise, schedule, "epsilon")

    torch.manual_seed(0)
    ours = UNet2DConditionModel(UNetConfig.from_diffusers_config(config))
    tmp = tempfile.TemporaryDirectory()
    trainer = Trainer(tmp.name, ours, TrainConfig(steps=10**6, batch_size=B, lr=1e-4, warmup_steps=1),
                      n_examples=n, loss_fn=loss_fn)

    # diffusers: the plain loop, fp32 and under bf16 autocast
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear")
    plain = {}
    for name in ("diffusers-fp32", "diffusers-bf16-autocast"):
        torch.manual_seed(0)
        model = diffusers.UNet2DConditionModel.from_config(config)
        model.train()
        plain[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))

    def plain_step(name: str, step: int) -> None:
        model, opt = plain[name]
        idx = torch.randint(0, n, (B,), generator=torch.Generator().manual_seed(step))
        x0, cond = latents[idx], states[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (B,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name.endswith("autocast")):
            pred = model(sched.add_noise(x0, noise, t), t, cond,
                         class_labels=None if pooled is None else pooled[idx]).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    runners = {"carrara": trainer.step, **{name: (lambda s, name=name: plain_step(name, s)) for name in plain}}
    times = {name: [] for name in runners}
    warmup = {}
    for name, run in runners.items():  # warm-up
        t0 = time.perf_counter()
        run(0)
        run(0)
        warmup[name] = time.perf_counter() - t0
    for r in range(args.rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            for s in range(args.steps_per_round):
                run(1 + r * args.steps_per_round + s)
            times[name].append(B * args.steps_per_round / (time.perf_counter() - t0))  # samples/s
    med = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "what": f"diffusion-stage training samples/s, batch {B}, {args.steps_per_round} steps per round, "
                "interleaved rounds, medians",
        "unet_params_M": sum(p.numel() for p in ours.parameters()) / 1e6,
        "carrara_autocast": str(trainer.dtype), "warmup_two_steps_s": warmup, "samples_per_s": times, "median_samples_per_s": med,
        "speedup_vs_diffusers_fp32": {k: v / med["diffusers-fp32"] for k, v in med.items()},
        "speedup_vs_diffusers_bf16_autocast": {k: v / med["diffusers-bf16-autocast"] for k, v in med.items()},
        "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
        "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
    }
    write_json_atomic(args.out, result)
    print(", ".join(f"{k} {v:.1f} samples/s" for k, v in med.items()))
    print("speed-up vs diffusers fp32: " + ", ".join(f"{k} {v:.2f}×" for k, v in
                                                      result["speedup_vs_diffusers_fp32"].items()))
    print(f"wrote {args.out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
