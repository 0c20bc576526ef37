"""img2img and inpainting on a real model (issue 19): how far each strength moves a picture, what inpainting does to
the region it keeps, and the time per edit. Writes bench/results/editing.json and docs/images/editing.png.

    python bench/editing.py --data data/emoji64 [--model default] [--n 32]

Inpainting regenerates the centre half-square of each picture with its own caption. The kept region of the
*decoded* result (before the init's pixels are pasted back) is compared with the autoencoder's reconstruction of
the same picture, over the whole kept region and over its part at least 8 px from the mask (the decoder's
receptive field carries the new content a few pixels out). After the paste the kept pixels are the init's own.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from families import cpu_kind

from carrara.data.load import load_dataset
from carrara.fileio import write_json_atomic
from carrara.images import image_grid, to_model_range, to_pil
from carrara.pipeline import Pipeline

STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)


def mean_abs_255(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """Mean |a − b| in 0…255 pixel units over the pixels where `where` (B, 1, H, W) is 1."""
    diff = (a - b).abs().mul(127.5).mean(1, keepdim=True)  # (B, 1, H, W)
    return (diff * where).sum().item() / where.sum().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a dataset folder at the model's base size (carrara data build)")
    p.add_argument("--model", default="default")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="bench/results/editing.json")
    p.add_argument("--figure", default="docs/images/editing.png")
    args = p.parse_args()
    pipe = Pipeline.load(args.model)
    side = pipe.sizes[0]
    ds = load_dataset(args.data, size=side)
    idx = torch.linspace(0, len(ds) - 1, args.n).long().tolist()
    init = to_model_range(torch.stack([ds.image_uint8(i) for i in idx]))  # (n, 3, side, side)
    prompts = [ds.records[i].text for i in idx]
    scale = pipe.vae.config.scaling_factor
    with torch.no_grad():
        recon = pipe.decode(pipe.vae.encode(init).mode() * scale)
    everywhere = torch.ones(len(idx), 1, side, side)
    result = {"cpu": cpu_kind(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "model": args.model,
              "model_hash": pipe.model_hash, "n": len(idx), "steps": args.steps, "side": side,
              "autoencoder_error_255": mean_abs_255(recon, init, everywhere)}
    # img2img: distance from the picture per strength, and seconds per image (batch n)
    sweep, figure_rows = {}, []
    for s in STRENGTHS:
        t0 = time.perf_counter()
        out = pipe(prompts, init_image=init, strength=s, steps=args.steps, seed=0, output="tensor")
        seconds = (time.perf_counter() - t0) / len(idx)
        sweep[str(s)] = {"distance_from_init_255": mean_abs_255(out, init, everywhere), "s_per_image": seconds}
        figure_rows.append(out[:6])
    result["img2img"] = sweep
    # inpainting: regenerate the centre half-square
    mask = torch.zeros(len(idx), 1, side, side)
    q = side // 4
    mask[..., q:side - q, q:side - q] = 1.0
    far = torch.ones_like(mask)  # kept pixels ≥ 8 px from the mask
    far[..., max(q - 8, 0):side - q + 8, max(q - 8, 0):side - q + 8] = 0.0
    kept = 1.0 - mask
    t0 = time.perf_counter()
    latent = pipe(prompts, init_image=init, mask=mask, steps=args.steps, seed=0, output="latent")
    seconds = (time.perf_counter() - t0) / len(idx)
    with torch.no_grad():
        decoded = pipe.decode(latent)
    pasted = pipe(prompts, init_image=init, mask=mask, steps=args.steps, seed=0, output="tensor")
    result["inpaint"] = {
        "mask": "centre half-square", "s_per_image": seconds,
        "kept_error_255": mean_abs_255(decoded, init, kept),
        "kept_error_of_reconstruction_255": mean_abs_255(recon, init, kept),
        "kept_error_8px_from_mask_255": mean_abs_255(decoded, init, far),
        "reconstruction_error_8px_from_mask_255": mean_abs_255(recon, init, far),
        "kept_error_after_paste_255": mean_abs_255(pasted, init, kept),
        "masked_change_255": mean_abs_255(pasted, init, mask),
    }
    figure_rows.append(pasted[:6])
    rows = [init[:6]] + figure_rows
    labels = [f"{name}: {prompts[j][:18]}" for name in ["init"] + [f"s={s}" for s in STRENGTHS] + ["inpaint"]
              for j in range(min(6, len(idx)))]
    grid = image_grid(to_pil(torch.cat(rows)), rows=len(rows), labels=labels, scale=2)
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.figure)
    write_json_atomic(Path(args.out), result)
    print(json.dumps(result, indent=1))
    print(f"median img2img s/image {statistics.median(v['s_per_image'] for v in sweep.values()):.2f}")


if __name__ == "__main__":
    main()
