"""Is a shapes model's faithfulness limited by its autoencoder? The detector on real renders vs their VAE
reconstructions, for the same 200 one-object captions `carrara eval faithfulness` uses (seed 0).

    python experiments/faithfulness_ae_ceiling.py [--vae runs/shapes/diffusion/vae] [--n 200]
"""
from __future__ import annotations

import argparse

import torch

from carrara.data import shapes
from carrara.data.folder import to_tensor
from carrara.evaluate.detector import detect
from carrara.evaluate.faithfulness import _summarize, sample_prompts, score
from carrara.images import to_model_range, to_pil
from carrara.models.autoencoder import AutoencoderKL


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vae", default="runs/shapes/diffusion/vae")
    p.add_argument("--n", type=int, default=200)
    args = p.parse_args()
    vae = AutoencoderKL.from_pretrained(args.vae)
    prompts = sample_prompts(args.n, 1, 0)
    real, recon = [], []
    with torch.inference_mode():
        for i in range(0, args.n, 25):
            batch = prompts[i:i + 25]
            images = [shapes.render(scene, 64).convert("RGB") for scene, _ in batch]
            x = to_model_range(torch.stack([to_tensor(im) for im in images]))  # (B, 3, 64, 64) in [-1, 1]
            rebuilt = to_pil(vae(x))  # (B, 3, 64, 64) → PIL, through the posterior mean
            real += [score(s, detect(im)) for (s, _), im in zip(batch, images)]
            recon += [score(s, detect(im)) for (s, _), im in zip(batch, rebuilt)]
    for name, outcomes in (("real renders", real), ("VAE reconstructions", recon)):
        print(f"{name}: " + ", ".join(f"{k} {v['accuracy']:.1%}" for k, v in _summarize(outcomes, 1).items()))


if __name__ == "__main__":
    main()
