"""Issue 17, acceptance 2 and 3: a cascade's 128-px images against bicubic upscaling of the same 64-px images.

For a cascade model folder (a base model with its upsampler/ stage, `carrara export cascade`) and the 128-px images
of its dataset (`carrara data build emoji --size 128`: images + metadata.jsonl):
  captions  n captions of DATA, drawn as `carrara eval` draws them (random.Random(--seed).randrange over its records,
            repeats allowed), so the prompt list is run_eval's; caption i keeps its own real image;
  base      the base's 64-px image of caption i from seed --seed + i at the model's sampling defaults
            (diffusion/settings.py: 20 DPM-Solver++ steps, w = 4; a distilled student's own), made ONCE and kept in
            OUT/base64.pt as the floats the pipeline hands its upsampler, for every row below and every rerun;
  bicubic   torch's bicubic ×2 of those images, clamped to [−1, 1] (the bicubic row of the stage's training grids);
  cascade   the upsampler on the same images and text, image i from seed --seed + i (so each is what `carrara
            generate --size 128` makes), at each setting of a sweep of its sampling: noise-conditioning augmentation
            level s ∈ --aug-levels × steps ∈ --up-steps. Cascaded Diffusion Models (Ho et al. 2021, §4.2) and Imagen
            (§2.5) choose the level at sampling by such a sweep; here the setting with the lowest SWD at 128 px
            (below) is `chosen`, the setting a recipe should ship;
  FD        Fréchet distance (evaluate/fid.py) between each set of n images and the real 128-px images, in the
            features of a `carrara train clip --size 128` run (--clip; one that sees another size is refused),
            each with the 95 % bootstrap interval of evaluate/suite.py (both sets resampled, recentred on the
            estimate). The real set is ALL images of DATA: the emoji set has no held-out split (base and upsampler
            trained on all of it), so FD measures the distance to the training distribution, for every row alike;
  patch FD  with --patch-clip (a CLIP run at the BASE's side, 64 px): the same FD in that network's features of every
            non-overlapping 64² tile of each 128-px image, real and generated (4 per image): a network that sees all
            128² pixels at their own scale, where the 128-px CLIP's stride-2 stem sees a 64² image and cannot tell
            sharp from blurred. This is patch FID (pFID: Chai et al. 2022, "Any-resolution training for
            high-resolution image synthesis", §4), here on a fixed tiling. Its interval resamples images with all
            their tiles (the tiles of one image are not independent);
  SWD       the sliced Wasserstein distance ×10³ over 7×7 Laplacian-pyramid neighbourhoods at 128, 64, 32, 16 px
            (Karras et al. 2018; evaluate/swd.py) between each set and the n real images of its captions: the 128-px
            level holds only the detail between 64 and 128 px — what an upsampler adds and a text-trained CLIP may
            not see. The 128-px level has a 95 % bootstrap interval over images for the rows that decide
            (--swd-bootstrap resamples: one SWD of 3,789 images takes ~15 s on one core, so 50 resamples per
            row would take 1 h at that n);
  floor     the same n real 128-px images box-downsampled to 64 (upsampler.downsample: the stage's training
            condition), then bicubic ×2: what bicubic reaches from perfect 64-px images;
  stage     the upsampler (chosen setting) on those real 64-px images as it was trained to see them (a stage with
            `degrade = autoencoder` gets their round trip through the cascade's own autoencoder, and bicubic of that
            round trip is its row's baseline): FD, SWD, and PSNR against the real 128-px image (per image
            10·log10(255² / MSE) over its uint8 pixels, the mean over images with its bootstrap interval), beside the
            floor's: the stage alone, without the base's errors;
  sanity    FD between two random halves of the real images (n_real / 2 each: the FD of two samples of one
            distribution at that size; FD is biased upwards at small n, so compare rows of equal n); SWD of n other
            real images (drawn with --seed + 1) against the captions' own;
  time      seconds per image of the base alone (64 px) and base + upsampler (128 px, chosen setting), at batch
            --batch and for one image, the median of 3 calls after a warm-up, on --threads threads; the acceptance
            asks that the upsampler add at most the base's time;
  figure    the first --figure-n captions: base 64 (enlarged, nearest), bicubic 128, cascade 128 (chosen), real 128.

    python bench/cascade.py --model MODEL --data DATA128 --clip CLIP128 [--patch-clip CLIP64] [--n 500]
        [--aug-levels 0,50,100,200] [--up-steps 5,8,10,20] [--threads 1] [--out runs/cascade-bench]
    python bench/cascade.py --tiny     # a tiny cascade and a tiny 128-px CLIP on 24 shapes: checks the bench
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from families import cached, check_clip, cpu_kind, families_grid, image_row, train_config
from routes import TINY_UNET, seconds_per_image

from carrara.data.folder import load_folder
from carrara.data.load import preload_images
from carrara.data.shapes import build_shapes
from carrara.errors import CarraraError
from carrara.evaluate.fid import feature_stats, frechet_distance
from carrara.evaluate.suite import bootstrap_interval
from carrara.evaluate.swd import descriptors, swd
from carrara.fileio import ensure_dir, no_empty_folder_left, save_image_atomic, write_json_atomic
from carrara.images import to_model_range, to_uint8
from carrara.models.blocks import text_kv_cache
from carrara.models.clip import ClipScorer
from carrara.pipeline import Pipeline
from carrara.train.clip import ClipRecipe, train_clip
from carrara.train.diffusion import DiffusionRecipe, train_diffusion
from carrara.train.upsampler import UpsamplerRecipe, train_upsampler
from carrara.upsampler import UpsamplerSettings, assemble_cascade, autoencoder_round_trip, bicubic, downsample

FULL = {"n": 500, "bootstrap": 50, "batch": 16, "rounds": 3, "figure_n": 8, "aug_levels": "0,50,100,200",
        "up_steps": "5,8,10,20"}
TINY = {"n": 8, "bootstrap": 5, "batch": 4, "rounds": 1, "figure_n": 4, "aug_levels": "0,100", "up_steps": "2"}
TINY_IMAGES, TINY_STEPS, TINY_BATCH = 24, 3, 4  # the tiny stages: 24 shapes, 3 training steps of 4 images
CELL = 128  # the figure's cell: the 128-px images at their own size


def pick_captions(texts: list[str], n: int, seed: int) -> list[int]:
    """The record of each of n captions, drawn as run_eval draws its prompts (so both score the same captions)."""
    rng = random.Random(seed)
    return [rng.randrange(len(texts)) for _ in range(n)]


def psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-image PSNR in dB (N,) of uint8 images (N, 3, H, W): 10·log10(255² / MSE) over all pixels and channels."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)  # (N,)
    return (10 * torch.log10(255.0**2 / mse)).numpy()


def fd_row(fake: np.ndarray, real: np.ndarray, bootstrap: int) -> dict:
    """FD of two feature sets (N, D) with its bootstrap interval and sample counts."""
    def fd(a, b):
        return frechet_distance(*feature_stats(b), *feature_stats(a))

    return {"fd": fd(fake, real), "fd_ci95": bootstrap_interval(fd, fake, real, n=bootstrap),
            "n_gen": len(fake), "n_real": len(real)}


def tiles(images: torch.Tensor, side: int) -> torch.Tensor:
    """(N, k, C, side, side): the k = (H/side)·(W/side) non-overlapping tiles of each image (N, C, H, W), row-major."""
    n, c, h, w = images.shape
    if h % side or w % side:
        raise CarraraError(f"{h}×{w} images do not tile into {side}² patches")
    grid = images.reshape(n, c, h // side, side, w // side, side).permute(0, 2, 4, 1, 3, 5)
    return grid.reshape(n, (h // side) * (w // side), c, side, side)


def patch_fd_row(fake: np.ndarray, real: np.ndarray, dim: int, bootstrap: int) -> dict:
    """Patch FD of per-image tile features (N, k·dim): FD over all N·k tiles, its interval resampling whole images."""
    def fd(a, b):
        return frechet_distance(*feature_stats(b.reshape(-1, dim)), *feature_stats(a.reshape(-1, dim)))

    return {"patch_fd": fd(fake, real), "patch_fd_ci95": bootstrap_interval(fd, fake, real, n=bootstrap),
            "patch_n_gen": fake.size // dim, "patch_n_real": real.size // dim}


def psnr_row(values: np.ndarray, bootstrap: int) -> dict:
    def mean(a):
        return float(a.mean())

    return {"psnr_db": mean(values), "psnr_db_ci95": bootstrap_interval(mean, values, n=bootstrap)}


def swd_row(images: torch.Tensor, real: dict, bootstrap: int, seed: int) -> dict:
    """SWD ×10³ per pyramid level of uint8 images against the real descriptors `real`; with bootstrap > 0 the finest
    level's 95 % interval from resampling the images of both sets."""
    fake, finest = descriptors(images, seed=seed), max(real)
    row = {"swd": {str(res): swd(fake[res], real[res]) for res in sorted(real, reverse=True)}}
    if bootstrap:
        row["swd_ci95"] = bootstrap_interval(swd, fake[finest], real[finest], n=bootstrap)
    return row


def features_of(scorer: ClipScorer, images: torch.Tensor) -> np.ndarray:
    """float64 image embeddings (N, D) of uint8 images, the features every FD here is measured in."""
    return scorer.embed_images(images).numpy().astype(np.float64)


def disjoint_below(a: dict, b: dict, key: str = "fd_ci95") -> bool:
    """True when a's interval (FD's, or another `key`) lies wholly below b's."""
    return a[key][1] < b[key][0]


def batches(n: int, size: int, what: str, progress: bool):
    """(start, stop) of each batch, with a progress bar."""
    with tqdm(total=n, desc=what, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, n, size):
            yield start, min(n, start + size)
            bar.update(min(n, start + size) - start)


def base_images(pipe: Pipeline, prompts: list[str], sampling: dict, seed: int, batch: int, progress: bool):
    """The base's images (n, 3, 64, 64) in [−1, 1], as the pipeline hands them to its upsampler: image i from seed + i."""
    return torch.cat([pipe(prompts[a:b], **sampling, seed=seed + a, size=pipe.sizes[0], output="tensor").float()
                      for a, b in batches(len(prompts), batch, "base 64 px", progress)])


def upsample(pipe: Pipeline, lowres: torch.Tensor, prompts: list[str], settings: UpsamplerSettings, seed: int,
             batch: int, progress: bool) -> torch.Tensor:
    """uint8 (n, 3, 2h, 2w): the pipeline's step 5 on given small images — its text states, image i from seed + i."""
    out = []
    with torch.inference_mode(), text_kv_cache(pipe.upsampler.unet):
        for a, b in batches(len(prompts), batch, f"upsampler s={settings.aug_level} {settings.steps} steps", progress):
            cond, uncond = pipe.condition(prompts[a:b])[0], pipe.condition([""] * (b - a))[0]
            out.append(to_uint8(pipe.upsampler(lowres[a:b], cond, uncond, seed=seed + a, settings=settings)))
    return torch.cat(out)


def sweep_settings(pipe: Pipeline, aug_levels: list[int], up_steps: list[int]) -> dict[str, UpsamplerSettings]:
    """Every (level, steps) of the sweep, the stage's recorded sampler and guidance kept; levels checked up front."""
    T = pipe.upsampler.schedule.T
    bad = [s for s in aug_levels if not 0 <= s < T]
    if bad or not aug_levels or not up_steps or min(up_steps) < 1:
        raise CarraraError(f"--aug-levels must lie in [0, {T - 1}] and --up-steps be ≥ 1 (got {aug_levels}, "
                           f"{up_steps})")
    recorded = pipe.upsampler.settings
    return {f"aug{s}_steps{k}": dataclasses.replace(recorded, aug_level=s, steps=k)
            for s in aug_levels for k in up_steps}


def int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise CarraraError(f"{flag} takes a comma list of whole numbers, got {text!r}") from None


def load_cascade(model: str, precision: str) -> Pipeline:
    """The cascade, or one error line: the bench compares its upsampler stage with bicubic."""
    pipe = Pipeline.load(model, precision=precision)
    if pipe.upsampler is None:
        raise CarraraError(f"{model} has no upsampler stage (upsampler/): the bench compares a cascade's second "
                           "stage with bicubic; assemble one with `carrara export cascade`")
    return pipe


def load_real(data: str, side: int, progress: bool) -> tuple[torch.Tensor, list[str]]:
    """The real images (N, 3, side, side) uint8 and their captions, or one error line."""
    images, texts = preload_images(load_folder(data), progress=progress)
    if images.shape[-1] != side or images.shape[-2] != side:
        raise CarraraError(f"--data {data} holds {images.shape[-1]}×{images.shape[-2]} images; the cascade makes "
                           f"{side}×{side}: build the data at that size (carrara data build … --size {side})")
    if len(images) < 4:
        raise CarraraError(f"--data {data} holds {len(images)} images; the real-vs-real row needs at least 4")
    return images, texts


def timings(pipe: Pipeline, prompts: list[str], sampling: dict, chosen: UpsamplerSettings, batch: int,
            rounds: int) -> dict:
    """Seconds per image of the base alone and of base + upsampler, at `batch` and for one image."""
    out = {}
    for name, extra in (("base", {"size": pipe.sizes[0]}), ("cascade", {"size": pipe.sizes[-1], "upsampler": chosen})):
        for key, size in (("batch", batch), ("one", 1)):
            out[f"{name}_s_per_image_{key}"] = seconds_per_image(pipe, prompts, size, rounds, **sampling, **extra)
    for key in ("batch", "one"):
        added = out[f"cascade_s_per_image_{key}"] - out[f"base_s_per_image_{key}"]
        out[f"upsampler_added_s_per_image_{key}"] = added
        out[f"upsampler_at_most_base_{key}"] = added <= out[f"base_s_per_image_{key}"]
    return out


def figure(base: torch.Tensor, bicubic_up: torch.Tensor, cascade: torch.Tensor, real: torch.Tensor,
           prompts: list[str]) -> Image.Image:
    """The same captions and seeds down the rows: base 64 (nearest), bicubic 128, cascade 128, real 128."""
    rows = {"base 64": image_row([Image.fromarray(im.permute(1, 2, 0).numpy()) for im in to_uint8(base)])}
    for name, images in (("bicubic 128", bicubic_up), ("cascade 128", cascade), ("real 128", real)):
        rows[name] = image_row([Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images])
    return families_grid(rows, prompts, cell=CELL)


def build_tiny(out: Path, progress: bool) -> tuple[Path, Path, Path, Path]:
    """A tiny cascade (pixel-space base at 64 px as 16×16×48, upsampler 64 → 128), a tiny 128-px CLIP and a tiny 64-px
    one (patch FD), each trained TINY_STEPS steps on 24 shapes (built at 128 and 64 px), once per folder:
    (model, data128, clip, patch_clip)."""
    data = {}
    for side in (128, 64):
        data[side] = out / f"data{side}"
        if not (data[side] / "metadata.jsonl").is_file():
            build_shapes(data[side], n=TINY_IMAGES, size=side, seed=0, progress=progress, overwrite=True)
    base = DiffusionRecipe(data=str(data[64]), size=64, autoencoder="pixels:4", schedule="cosine",
                           prediction_type="v_prediction", sample_prompts=["a large red circle on the left"])
    up = UpsamplerRecipe(data=str(data[128]), size=128, crop=32, sampling=UpsamplerSettings(steps=2))
    clip = ClipRecipe(data=str(data[128]), size=128, holdout=2)
    patch_clip = ClipRecipe(data=str(data[64]), size=64, holdout=2)
    base.model = {**base.model, **TINY_UNET}
    up.model = {**up.model, **TINY_UNET, "class_embed_type": "timestep"}
    for c in (clip, patch_clip):
        c.model = {**c.model, "channels": [8, 16], "embed_dim": 16, "groups": 4}
    for name, recipe, train in (("base", base, train_diffusion), ("upsampler", up, train_upsampler),
                                ("clip", clip, train_clip), ("patch-clip", patch_clip, train_clip)):
        done = out / name / ("clip/config.json" if "clip" in name else "model_index.json")
        if not done.is_file():
            recipe.train = train_config(recipe.train, TINY_STEPS, TINY_BATCH, 1, probe=False)
            train(recipe, out / name, progress=progress)
    if not (out / "model" / "model_index.json").is_file():
        assemble_cascade(out / "base", out / "upsampler", out / "model")
    return out / "model", data[128], out / "clip", out / "patch-clip"


def markdown_table(result: dict) -> str:
    """The rows, FD with its interval (and PSNR where there is one), for docs/default-model.md."""
    r = result["rows"]
    named = {"bicubic ×2 of the base's 64 px": r["bicubic"]}
    named.update({f"cascade, s = {c['aug_level']}, {c['steps']} steps" + (" (chosen)" if k == r["chosen"] else ""): c
                  for k, c in r["cascade"].items()})
    stage_input = r["real64_upsampler"].get("input", "clean")
    named.update({"real 64 px, bicubic ×2 (floor)": r["real64_bicubic"]})
    if "real64_input_bicubic" in r:
        named[f"real 64 px through the {stage_input}, bicubic ×2"] = r["real64_input_bicubic"]
    named.update({f"real 64 px ({stage_input}), upsampler (chosen)": r["real64_upsampler"],
                  "real vs real: FD two halves, SWD other images": {**r["real128_halves"], **r["real128_other"]}})
    levels, patch = list(r["bicubic"]["swd"]), "patch_fd" in r["bicubic"]
    lines = ["| images at 128 px | FD | 95 % interval | " + ("patch FD [95 %] | " if patch else "") + "SWD×10³ "
             + " / ".join(levels) + " | SWD 128 interval | PSNR dB |", "|---" * (6 + patch) + "|"]
    for name, row in named.items():
        p = f"{row['psnr_db']:.2f}" if "psnr_db" in row else ""
        ci = f"[{row['swd_ci95'][0]:.1f}, {row['swd_ci95'][1]:.1f}]" if "swd_ci95" in row else ""
        pfd = (f"{row['patch_fd']:.4g} [{row['patch_fd_ci95'][0]:.4g}, {row['patch_fd_ci95'][1]:.4g}] | "
               if "patch_fd" in row else "| " if patch else "")
        swd_cells = " / ".join(f"{row['swd'][k]:.1f}" for k in levels) if "swd" in row else ""
        lines.append(f"| {name} | {row['fd']:.4g} | [{row['fd_ci95'][0]:.4g}, {row['fd_ci95'][1]:.4g}] | {pfd}"
                     + swd_cells + f" | {ci} | {p} |")
    t, cpu = result["time"], result["cpu"]
    lines.append("")
    lines.append(f"s/image base {t['base_s_per_image_batch']:.3f} (batch {result['batch']}), "
                 f"{t['base_s_per_image_one']:.3f} (one); cascade {t['cascade_s_per_image_batch']:.3f}, "
                 f"{t['cascade_s_per_image_one']:.3f}; {cpu['kind']} ({cpu['model']}), {cpu['threads']} threads; "
                 f"features {result['feature_network']}; n = {result['n']} captions, FD against all "
                 f"{result['n_real']} real images, SWD against the captions' own.")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a cascade model folder (a base with upsampler/), or a packaged name")
    p.add_argument("--data", help="the real images at the cascade's side with their captions (metadata.jsonl)")
    p.add_argument("--clip", help="a `carrara train clip --size 128` run: the features FD is measured in")
    p.add_argument("--patch-clip", help="a CLIP run at the base's side (64 px): patch FD over every tile of the "
                   "128-px images (optional; --tiny trains one)")
    p.add_argument("--n", type=int, help=f"captions (default {FULL['n']}; tiny {TINY['n']})")
    p.add_argument("--aug-levels", help=f"the sweep's augmentation levels s (default {FULL['aug_levels']})")
    p.add_argument("--up-steps", help=f"the sweep's upsampler steps (default {FULL['up_steps']})")
    p.add_argument("--bootstrap", type=int, help=f"bootstrap resamples per interval (default {FULL['bootstrap']})")
    p.add_argument("--swd-bootstrap", type=int, help="bootstrap resamples per SWD interval (default --bootstrap's; "
                   "each costs one SWD: ~15 s at n = 3,789 on one core)")
    p.add_argument("--batch", type=int, help=f"images per call, and the timed batch (default {FULL['batch']})")
    p.add_argument("--rounds", type=int, help=f"timed calls per row, median (default {FULL['rounds']})")
    p.add_argument("--figure-n", type=int, help=f"captions in the figure (default {FULL['figure_n']})")
    p.add_argument("--seed", type=int, default=0, help="the captions' draw, and image i's seed + i (default 0)")
    p.add_argument("--precision", default="auto", help="the pipeline's precision (default auto)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    p.add_argument("--out", help="cache folder (default runs/cascade-bench, tiny runs/cascade-tiny)")
    p.add_argument("--json", help="results (default bench/results/cascade-<cpu kind>.json, tiny OUT/cascade.json)")
    p.add_argument("--grid", help="the figure (default docs/images/cascade-grid.png, tiny OUT/cascade-grid.png)")
    p.add_argument("--tiny", action="store_true", help="a tiny cascade and CLIP on 24 shapes: checks the bench")
    p.add_argument("--time-only", action="store_true", help="only the time rows (needs --model only), with the "
                   "upsampler's recorded setting, into bench/results/cascade-time-<cpu kind>.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


TIME_PROMPTS = ["cat face", "a red sports car", "pizza", "a snowman in the snow", "red heart", "rocket",
                "a happy kitty", "flag of France"]


def time_only(args: argparse.Namespace) -> dict:
    """Acceptance 3's rows alone: seconds per image of the base and of the cascade, at --batch and for one image
    (medians of --rounds calls after a warm-up), with the upsampler's recorded setting."""
    if not args.model:
        raise CarraraError("--time-only needs --model (a cascade)")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_cascade(args.model, args.precision)
    batch = args.batch or FULL["batch"]
    times = timings(pipe, TIME_PROMPTS, pipe.sampling, pipe.upsampler.settings, batch, args.rounds or FULL["rounds"])
    cpu = cpu_kind()
    result = {"what": "seconds per image of the base (64 px) and base + upsampler (128 px), recorded settings",
              "cpu": cpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "model": args.model,
              "model_hash": pipe.model_hash, "precision": pipe.precision, "compiled": pipe.compiled is not None,
              "batch": batch, "base_sampling": pipe.sampling,
              "upsampler": dataclasses.asdict(pipe.upsampler.settings), "time": times}
    json_path = args.json or f"bench/results/cascade-time-{cpu['kind']}.json"
    write_json_atomic(json_path, result)
    print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in times.items()))
    print(f"wrote {json_path}", file=sys.stderr)
    return result


def run(args: argparse.Namespace) -> dict:
    """The bench; a refused input leaves no empty --out folder behind."""
    if args.time_only:
        return time_only(args)
    out = Path(args.out or ("runs/cascade-tiny" if args.tiny else "runs/cascade-bench"))
    with no_empty_folder_left(out):
        return measure(args, out)


def measure(args: argparse.Namespace, out: Path) -> dict:
    """Every row of the module docstring, into the JSON and the figure; the costly images cached in `out`."""
    started, scale, progress = time.perf_counter(), TINY if args.tiny else FULL, not args.quiet
    n, bootstrap, batch, figure_n = (getattr(args, k) or scale[k] for k in ("n", "bootstrap", "batch", "figure_n"))
    swd_bootstrap = args.swd_bootstrap or bootstrap
    if n < 2 or min(bootstrap, swd_bootstrap, batch, figure_n) < 1 or (args.threads is not None and args.threads < 1):
        raise CarraraError("--n must be at least 2; --bootstrap, --swd-bootstrap, --batch, --figure-n and --threads "
                           "at least 1")
    aug_levels = int_list(args.aug_levels or scale["aug_levels"], "--aug-levels")
    up_steps = int_list(args.up_steps or scale["up_steps"], "--up-steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = ensure_dir(out)
    if args.tiny:
        model, data, clip, patch_clip = (str(p) for p in build_tiny(ensure_dir(out / "tiny"), progress))
    elif not (args.model and args.data and args.clip):
        raise CarraraError("give --model (a cascade), --data (its real 128-px images) and --clip (a 128-px CLIP run), "
                           "or --tiny")
    else:
        model, data, clip, patch_clip = args.model, args.data, args.clip, args.patch_clip
    pipe = load_cascade(model, args.precision)
    low_side, side = pipe.sizes
    check_clip(Path(clip), side)
    if patch_clip:
        check_clip(Path(patch_clip), low_side)
    sweep = sweep_settings(pipe, aug_levels, up_steps)
    real, texts = load_real(data, side, progress)
    idx = pick_captions(texts, n, args.seed)
    prompts, real_n = [texts[i] for i in idx], real[idx]  # caption i and its own real image
    sampling = pipe.sampling
    factor = pipe.upsampler.factor
    key = {"model_hash": pipe.model_hash, "precision": pipe.precision, "data": str(Path(data).resolve()), "n": n,
           "seed": args.seed, "prompts": prompts, **sampling}

    # 1. The base's images, once; bicubic and every upsampler setting from the same images.
    base = cached(out / "base64.pt", key, lambda: base_images(pipe, prompts, sampling, args.seed, batch, progress))
    bicubic_up = to_uint8(bicubic(base, factor))
    ensure_dir(out / "upsampled")
    up_key = {**key, "upsampler_hash": pipe.upsampler.weights_hash}  # the base's images are the base's alone
    cascade = {name: cached(out / "upsampled" / f"{name}.pt", {**up_key, **dataclasses.asdict(s)},
                            lambda s=s: upsample(pipe, base, prompts, s, args.seed, batch, progress))
               for name, s in sweep.items()}
    # 2. The real images' features; every row's FD against all of them.
    scorer = ClipScorer.load(clip)

    def features(images: torch.Tensor) -> np.ndarray:
        return features_of(scorer, images)

    real_f = features(real)
    real_d = descriptors(real_n, seed=args.seed)  # the captions' own real images, for SWD
    rows = {"bicubic": {**fd_row(features(bicubic_up), real_f, bootstrap),
                        **swd_row(bicubic_up, real_d, swd_bootstrap, args.seed)},
            "cascade": {name: {**dataclasses.asdict(sweep[name]), **fd_row(features(images), real_f, bootstrap),
                               **swd_row(images, real_d, 0, args.seed)}
                        for name, images in tqdm(cascade.items(), desc="judging", disable=not progress, leave=False)}}
    finest = str(max(real_d))
    chosen = min(rows["cascade"], key=lambda k: rows["cascade"][k]["swd"][finest])
    rows["chosen"] = chosen
    best = rows["cascade"][chosen]
    best.update(swd_row(cascade[chosen], real_d, swd_bootstrap, args.seed))  # its interval too
    # 3. The stage alone, on the real images downsampled as in its training, beside bicubic of the same.
    real_low = downsample(to_model_range(real_n), factor)  # (n, 3, 64, 64)
    stage_in = real_low
    if pipe.upsampler.degrade == "autoencoder":
        stage_in = autoencoder_round_trip(pipe.vae, real_low, progress=progress).float()
    floor_up = to_uint8(bicubic(real_low, factor))
    stage_up = cached(out / "upsampled" / "real64.pt",
                      {**up_key, **dataclasses.asdict(sweep[chosen]), "degrade": pipe.upsampler.degrade},
                      lambda: upsample(pipe, stage_in, prompts, sweep[chosen], args.seed, batch, progress))
    for name, images in (("real64_bicubic", floor_up), ("real64_upsampler", stage_up)) + (
            (("real64_input_bicubic", to_uint8(bicubic(stage_in, factor))),) if stage_in is not real_low else ()):
        rows[name] = {**fd_row(features(images), real_f, bootstrap), **swd_row(images, real_d, swd_bootstrap, args.seed),
                      **psnr_row(psnr(images, real_n), bootstrap)}
    rows["real64_upsampler"].update({**dataclasses.asdict(sweep[chosen]), "input": pipe.upsampler.degrade or "clean"})
    halves = torch.randperm(len(real), generator=torch.Generator().manual_seed(args.seed))
    rows["real128_halves"] = fd_row(real_f[halves[: len(real) // 2]], real_f[halves[len(real) // 2:]], bootstrap)
    patch_name = None
    if patch_clip:  # the same rows in the features of the base-size CLIP over every tile
        patch_scorer = ClipScorer.load(patch_clip)
        patch_name = f"{patch_scorer.name} over every {low_side}² tile"

        def patch_features(images: torch.Tensor) -> np.ndarray:
            return features_of(patch_scorer, tiles(images, low_side).flatten(0, 1)).reshape(len(images), -1)

        real_p = patch_features(real)
        dim = real_p.shape[1] // (side // low_side) ** 2  # the features of one tile
        fd_rows = [(rows["bicubic"], bicubic_up), *((rows["cascade"][k], v) for k, v in cascade.items()),
                   (rows["real64_bicubic"], floor_up), (rows["real64_upsampler"], stage_up)]
        for row, images in tqdm(fd_rows, desc="patch FD", disable=not progress, leave=False):
            row.update(patch_fd_row(patch_features(images), real_p, dim, bootstrap))
        rows["real128_halves"].update(patch_fd_row(real_p[halves[: len(real) // 2]], real_p[halves[len(real) // 2:]],
                                                   dim, bootstrap))
    rows["real128_other"] = swd_row(real[pick_captions(texts, n, args.seed + 1)], real_d, swd_bootstrap,
                                    args.seed)
    # 4. Time, 5. the figure.
    times = timings(pipe, prompts, sampling, sweep[chosen], batch, args.rounds or scale["rounds"])
    k = min(figure_n, n)
    grid = figure(base[:k], bicubic_up[:k], cascade[chosen][:k], real_n[:k], prompts[:k])
    cpu = cpu_kind()
    result = {
        "what": "the cascade's 128-px images against bicubic ×2 of the same 64-px images (issue 17, acceptance 2-3)",
        "cpu": cpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny,
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "model": model, "model_hash": pipe.model_hash,
        "upsampler_hash": pipe.upsampler.weights_hash,
        "precision": pipe.precision, "data": data, "clip": clip, "feature_network": scorer.name, "sizes": [low_side, side],
        "patch_clip": patch_clip, "patch_feature_network": patch_name,
        "n": n, "n_real": len(real), "real_set": f"all {len(real)} images of --data (no held-out split)",
        "seed": args.seed, "bootstrap": bootstrap, "swd_bootstrap": swd_bootstrap, "batch": batch, "base_sampling": sampling,
        "upsampler_recorded": dataclasses.asdict(pipe.upsampler.settings), "rows": rows,
        "cascade_vs_bicubic": {"fd_lower": best["fd"] < rows["bicubic"]["fd"],
                               "intervals_disjoint": disjoint_below(best, rows["bicubic"]),
                               "swd_lower": best["swd"][finest] < rows["bicubic"]["swd"][finest],
                               "swd_intervals_disjoint": disjoint_below(best, rows["bicubic"], "swd_ci95"),
                               **({"patch_fd_lower": best["patch_fd"] < rows["bicubic"]["patch_fd"],
                                   "patch_intervals_disjoint": disjoint_below(best, rows["bicubic"], "patch_fd_ci95")}
                                  if patch_clip else {})},
        "time": times, "wall_s": round(time.perf_counter() - started, 1),
    }
    json_path = args.json or (out / "cascade.json" if args.tiny else f"bench/results/cascade-{cpu['kind']}.json")
    grid_path = args.grid or (out / "cascade-grid.png" if args.tiny else "docs/images/cascade-grid.png")
    write_json_atomic(json_path, result)
    save_image_atomic(grid_path, grid)
    print(markdown_table(result))
    print(f"wrote {json_path} and {grid_path}", file=sys.stderr)
    return result


def main(argv=None) -> None:
    try:
        run(parse_args(argv))
    except CarraraError as e:
        print(f"carrara: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
