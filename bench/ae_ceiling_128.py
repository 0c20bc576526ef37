"""What a latent upsampler could reach at best: the v1 autoencoder's reconstruction PSNR at 64 and 128 px, against
bicubic 64 → 128 (docs/decisions.md, 2026-11-29). Needs the emoji data at both sizes:
    carrara data build emoji --out data/emoji64 && carrara data build emoji --out data/emoji128 --size 128
    python bench/ae_ceiling_128.py --data64 data/emoji64 --data128 data/emoji128
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F

from carrara.data.load import load_dataset
from carrara.images import to_model_range
from carrara.models.autoencoder import AutoencoderKL


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of images in [−1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(1 / ((a - b) / 2).pow(2).mean().item())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data64", required=True)
    p.add_argument("--data128", required=True)
    p.add_argument("--vae", default="carrara/assets/default/vae")
    p.add_argument("--n", type=int, default=64)
    args = p.parse_args()
    vae = AutoencoderKL.from_pretrained(args.vae).float().eval()
    out = {}
    for size, path in ((64, args.data64), (128, args.data128)):
        ds = load_dataset(path, size=size)
        idx = torch.linspace(0, len(ds) - 1, args.n).long().tolist()
        x = to_model_range(torch.stack([ds.image_uint8(i) for i in idx]))  # (n, 3, size, size)
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).mean).clamp(-1, 1)
        out[f"vae_psnr_{size}"] = psnr(rec, x)
        if size == 128:
            up = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bicubic").clamp(-1, 1)
            out["bicubic_64_to_128_psnr"] = psnr(up, x)
    print(json.dumps({k: round(v, 2) for k, v in out.items()}))


if __name__ == "__main__":
    main()
