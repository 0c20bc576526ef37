"""Does a model read x_t? Its x̂0 for several real images noised with the SAME ε at level t, under one prompt.

For images x_1 … x_m of --data named by --names (their captions), noise z0_i to z_t,i = α_t z0_i + σ_t ε with one
shared ε, and ask the U-Net for x̂0 under --prompt (a generic one, such as "a flag", that fits all of them). Per t:
  own     RMS distance (latent units) of x̂0_i to its own z0_i, mean over i;
  other   RMS distance of x̂0_i to the other images' z0_j, mean over i ≠ j;
  spread  mean pairwise RMS distance among the x̂0_i.
A denoiser that uses x_t keeps own well below other until high t; one that predicts from the text alone gives the
same x̂0 for every image (spread → 0, own ≈ other): its samples for that prompt are one blend, whatever the seed
(docs/decisions.md, 2026-11-30, session 12).

    python bench/x0_probe.py --models default /work/v2/diffusion --data DATA \
        --names "flag: France,flag: Germany,flag: Japan,flag: Brazil" --prompt "a flag" [--json OUT.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from families import cpu_kind

from carrara.data.folder import load_folder
from carrara.diffusion.objectives import to_x0_eps
from carrara.diffusion.schedule import add_noise
from carrara.errors import CarraraError
from carrara.fileio import write_json_atomic
from carrara.images import to_model_range
from carrara.pipeline import Pipeline

LEVELS = (300, 500, 700, 850, 950)


def load_named(data: str, names: list[str], side: int) -> torch.Tensor:
    """uint8 (m, 3, side, side) of the records whose caption is each name, or one error line."""
    folder = load_folder(data)
    by_text = {r.text: r for r in folder.records}
    missing = [n for n in names if n not in by_text]
    if missing or len(names) < 2:
        raise CarraraError(f"--names needs at least 2 captions of {data}; not found: {missing}")
    images = [Image.open(Path(data) / by_text[n].file_name).convert("RGB").resize((side, side)) for n in names]
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])


@torch.inference_mode()
def probe(pipe: Pipeline, images: torch.Tensor, prompt: str, levels=LEVELS, seed: int = 0) -> dict:
    """{t: {own, other, spread}} for uint8 images (m, 3, H, W) under `prompt` (see the module docstring)."""
    m = len(images)
    vae = pipe.vae  # the latents as training saw them: the posterior mean, scaled (pipeline.py's edit path)
    z0 = vae.encode(to_model_range(images)).mode().float() * vae.config.scaling_factor
    cond = pipe.condition([prompt] * m)
    eps = torch.randn(1, *z0.shape[1:], generator=torch.Generator().manual_seed(seed)).expand_as(z0)
    scale = z0[0].numel() ** 0.5
    out = {}
    for t in levels:
        tt = torch.full((m,), t)
        z_t = add_noise(pipe.schedule, z0, eps, tt)
        pred = pipe.unet(z_t.to(pipe.unet_dtype), tt, cond[0], class_labels=cond[1] if len(cond) > 1 else None)
        x0, _ = to_x0_eps(pred.float(), z_t, pipe.schedule.alphas_cumprod[t], pipe.schedule.prediction_type)
        d = torch.cdist(x0.flatten(1).double(), z0.flatten(1).double()) / scale  # (prediction i, image j)
        own = d.diagonal().mean().item()
        other = (d.sum() - d.diagonal().sum()).item() / (m * (m - 1))
        out[str(t)] = {"own": own, "other": other, "spread": torch.pdist(x0.flatten(1).double()).mean().item() / scale}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="model folders or packaged names")
    p.add_argument("--data", required=True, help="the dataset the images come from (metadata.jsonl)")
    p.add_argument("--names", required=True, help="comma list of captions of --data: the images")
    p.add_argument("--prompt", required=True, help="one prompt that fits all of them")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    try:
        result = {"cpu": cpu_kind(), "command": " ".join(sys.argv), "prompt": args.prompt,
                  "names": args.names.split(","), "models": {}}
        for model in args.models:
            pipe = Pipeline.load(model, precision="fp32")
            images = load_named(args.data, result["names"], pipe.sizes[0])
            result["models"][model] = r = probe(pipe, images, args.prompt)
            print(model, " | ".join(f"t={t}: own {v['own']:.3f} other {v['other']:.3f} spread {v['spread']:.3f}"
                                    for t, v in r.items()), flush=True)
        if args.json:
            write_json_atomic(args.json, result)
    except CarraraError as e:
        print(f"carrara: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
