"""`carrara eval`: generate from a dataset's captions, then FD, KID, CLIP score and faithfulness, in one report.

Every number is named by what measured it (`FD[carrara-clip[emoji-clip], n_gen=2000, n_real=3789]`); only
Fréchet distance on Inception-v3 pool3 features is called FID (Heusel et al. 2017). Each number carries a
bootstrap 95 % interval (percentiles over resamples of the generated and the real set, recentred by the
bootstrap's bias) and its sample
counts. Generated images stay uint8 tensors in memory: nothing is JPEG-compressed before scoring.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from carrara.data.folder import load_folder
from carrara.data.load import preload_images
from carrara.diffusion.settings import DEFAULTS
from carrara.errors import CarraraError
from carrara.evaluate.faithfulness import detector_ceiling, evaluate_faithfulness
from carrara.evaluate.fid import feature_stats, frechet_distance, kid
from carrara.evaluate.html import write_report_html
from carrara.evaluate.inception import InceptionFeatures
from carrara.evaluate.nll import latent_nll
from carrara.families.pipeline import load_any
from carrara.fileio import ensure_dir, save_image_atomic, write_json_atomic
from carrara.images import image_grid
from carrara.models.clip import ClipScorer, clip_score, retrieval

METRICS = ("fd", "kid", "clipscore", "retrieval", "faithfulness", "nll")
NLL_MAX_IMAGES = 256  # the bound costs T network calls per batch: 1000 × 8 batches of 32 on CPU


@dataclass
class EvalSettings:
    """What `carrara eval` measures and how (written into metrics.json)."""

    model: str
    data: str | None = None
    n: int = 2000
    metrics: tuple[str, ...] = ("fd", "kid", "clipscore")
    clip: str | None = None
    prompts: str | None = None  # a text file of prompts (one per line, # comments) instead of the data's captions
    inception_weights: str | None = None
    guidance: float = DEFAULTS.guidance
    steps: int | None = None  # None: the model's own (diffusion/settings.py's 20 dpmpp; a student's 4 lcm)
    sampler: str | None = None
    seed: int = 0
    batch_size: int = 32
    bootstrap: int = 50
    allow_pickle: bool = False  # let the model's or the Inception's weights be pickles, read weights-only
    kid_subset_size: int = 1000
    fast: bool = False  # judge the few-step student beside the model (carrara/student.py)
    precision: str = "auto"  # the U-Net's (Pipeline.load): auto, fp32, bf16 or int8 (its calibration beside it)
    extra: dict = field(default_factory=dict)


def bootstrap_interval(stat, a: np.ndarray, b: np.ndarray | None = None, *, n: int = 50,
                       seed: int = 0) -> list[float]:
    """95 % interval of stat(a[, b]) from n resamples (with replacement) of a and of b, recentred on the estimate.

    The percentile interval [q2.5, q97.5] of the resampled statistics, shifted by the bootstrap's bias
    mean(θ*) − θ̂. For a mean the bias is ~0 and this is the plain percentile interval. For the Fréchet distance
    it is not: a resample repeats ~37 % of the images, its features are less diverse, and its FD is larger
    (docs/evaluation.md shows it on the default model), so the plain percentile interval can lie entirely above
    the estimate. Shifted, it says how far the n-sample estimate moves between draws — the
    spread that matters when comparing models at equal n (Efron & Tibshirani 1993, §10 on bootstrap bias).
    """
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        ia = rng.integers(0, len(a), len(a))
        values.append(stat(a[ia]) if b is None else stat(a[ia], b[rng.integers(0, len(b), len(b))]))
    bias = float(np.mean(values)) - float(stat(a) if b is None else stat(a, b))
    return [float(np.percentile(values, 2.5)) - bias, float(np.percentile(values, 97.5)) - bias]


def generate_images(pipe, prompts: list[str], settings: EvalSettings, progress: bool = True,
                    size: int | None = None) -> torch.Tensor:
    """uint8 (N, 3, H, W): image j of the run uses seed + j, as `carrara generate --seed` would. `size`: a cascade's
    output side (its base's alone, or with the upsampler); None: the pipeline's default."""
    out, extra = [], {} if size is None else {"size": size}
    with tqdm(total=len(prompts), desc="generating", unit="img", disable=not progress) as bar:
        for start in range(0, len(prompts), settings.batch_size):
            batch = prompts[start:start + settings.batch_size]
            x = pipe(batch, steps=settings.steps, sampler=settings.sampler, guidance=settings.guidance,
                     seed=settings.seed + start, output="tensor", **extra)  # (B, 3, H, W) in [−1, 1]
            out.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
            bar.update(len(batch))
    return torch.cat(out)


def _fd_and_kid(name: str, real: np.ndarray, fake: np.ndarray, settings: EvalSettings, report: dict) -> None:
    def fd(a, b):
        return frechet_distance(*feature_stats(b), *feature_stats(a))

    counts = {"n_gen": len(fake), "n_real": len(real)}
    label = ", ".join([name] + [f"{k}={v}" for k, v in counts.items()])
    if "fd" in settings.metrics:
        value = fd(fake, real)
        title = f"FID[{label}]" if name.startswith("inception") else f"FD[{label}]"
        report["metrics"][title] = {"value": value, "ci95": bootstrap_interval(fd, fake, real, n=settings.bootstrap),
                                    "extractor": name, **counts}
    if "kid" in settings.metrics:
        size = min(settings.kid_subset_size, len(fake), len(real))  # kid() clips the same way, with a warning
        mean, std = kid(real, fake, subsets=100, subset_size=settings.kid_subset_size, seed=settings.seed)
        report["metrics"][f"KID[{label}, subset={size}]"] = {"value": mean, "std_over_subsets": std,
                                                             "extractor": name, **counts}


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty, non-comment lines of a prompts file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CarraraError(f"--prompts {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    prompts = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    if not prompts:
        raise CarraraError(f"--prompts {path}: no prompts in it (one per line; # starts a comment)")
    return prompts


def run_eval(settings: EvalSettings, out_dir: str | Path, progress: bool = True) -> dict:
    """Generate n images for captions of `settings.data`, score them, write metrics.json + report.html."""
    unknown = set(settings.metrics) - set(METRICS)
    if unknown:
        raise CarraraError(f"--metrics: unknown {sorted(unknown)}; choose from {','.join(METRICS)}")
    needs_data = {"fd", "kid", "clipscore", "retrieval"} & set(settings.metrics)
    if needs_data and not settings.data:
        raise CarraraError(f"--metrics {','.join(sorted(needs_data))} need --data DIR (the real images and captions)")
    if settings.n < 2 and ({"fd", "kid", "retrieval"} & set(settings.metrics)):
        raise CarraraError(f"--n {settings.n}: FD, KID and retrieval need at least 2 generated images")
    if ({"fd", "kid"} & set(settings.metrics)) and not (settings.clip or settings.inception_weights):
        raise CarraraError("FD and KID need a feature network: --clip RUN (carrara train clip) and/or "
                           "--inception-weights PATH")
    if "nll" in settings.metrics and not settings.data:
        raise CarraraError("--metrics nll needs --data DIR: the held-out images (and captions) to score")
    for metric in ("clipscore", "retrieval"):
        if metric in settings.metrics and not settings.clip:
            raise CarraraError(f"{metric} needs --clip RUN (a `carrara train clip` run)")
    own_prompts = read_prompts(settings.prompts) if settings.prompts else None
    out_dir = ensure_dir(out_dir)
    pipe = load_any(settings.model, allow_pickle=settings.allow_pickle,  # a diffusion model, a cascade or a family
                    precision=settings.precision, **({"fast": True} if settings.fast else {}))
    own = getattr(pipe, "sampling", {"steps": DEFAULTS.steps, "sampler": DEFAULTS.sampler})  # the model's defaults
    settings = replace(settings, steps=settings.steps or own["steps"], sampler=settings.sampler or own["sampler"])
    report = {"settings": asdict(settings), "model_hash": pipe.model_hash, "precision": pipe.precision, "metrics": {}}
    started = time.perf_counter()

    if needs_data:
        real_images, real_texts = preload_images(load_folder(settings.data), progress=progress)
        rng = random.Random(settings.seed)
        if own_prompts is not None:  # the file's prompts in order, repeated if n asks for more
            prompts = [own_prompts[i % len(own_prompts)] for i in range(settings.n)]
        else:
            prompts = [real_texts[rng.randrange(len(real_texts))] for _ in range(settings.n)]
        side = real_images.shape[-1]
        # a cascade is judged at the data's side when it makes that side: its base alone against 64-px data
        size = side if len(getattr(pipe, "sizes", ())) > 1 and side in pipe.sizes else None
        fake = generate_images(pipe, prompts, settings, progress, size=size)
        if fake.shape[-2:] != real_images.shape[-2:]:
            raise CarraraError(f"the model makes {tuple(fake.shape[-2:])} images, the data holds "
                               f"{tuple(real_images.shape[-2:])}: evaluate against data of the model's size")
        save_image_atomic(out_dir / "samples.png", image_grid(_to_pil(fake[:64]), rows=8))
        if settings.clip:
            scorer = ClipScorer.load(settings.clip)
            emb_fake, emb_real = scorer.embed_images(fake), scorer.embed_images(real_images)
            if "clipscore" in settings.metrics:
                s_fake = clip_score(emb_fake, scorer.embed_texts(prompts)).numpy()
                s_real = clip_score(emb_real, scorer.embed_texts(real_texts)).numpy()
                mean = lambda a: float(a.mean())
                for key, s in ((f"CLIPScore[{scorer.name}, generated]", s_fake), (f"CLIPScore[{scorer.name}, real]", s_real)):
                    report["metrics"][key] = {"value": mean(s), "ci95": bootstrap_interval(mean, s, n=settings.bootstrap),
                                              "n": len(s)}
            if "retrieval" in settings.metrics:  # does each prompt find its own image among the generated ones?

                hits: dict = {}
                r = retrieval(emb_fake, prompts, scorer.embed_texts, hits=hits)
                for k in (1, 5):
                    h = hits[f"t2i_top{k}"]
                    report["metrics"][f"T2I-top{k}[{scorer.name}, among generated, n_gen={len(prompts)}]"] = {
                        "value": r[f"t2i_top{k}"], "ci95": bootstrap_interval(lambda a: float(a.mean()), h,
                                                                              n=settings.bootstrap), "n": len(h)}
            _fd_and_kid(scorer.name, emb_real.numpy().astype(np.float64), emb_fake.numpy().astype(np.float64),
                        settings, report)
        if settings.inception_weights and {"fd", "kid"} & set(settings.metrics):
            net = InceptionFeatures(settings.inception_weights, allow_pickle=settings.allow_pickle)
            _fd_and_kid(f"{net.name}, resize=PIL-bicubic-299", net.extract(real_images, progress=progress),
                        net.extract(fake, progress=progress), settings, report)

    if "faithfulness" in settings.metrics:
        for objects, key in ((1, "one_object"), (2, "two_objects")):
            n = min(settings.n, 200)
            model = evaluate_faithfulness(pipe, n=n, objects=objects, steps=settings.steps, sampler=settings.sampler,
                                          guidance=settings.guidance, seed=settings.seed, progress=progress)
            ceiling = detector_ceiling(n, objects, settings.seed)
            report["metrics"][f"faithfulness[{key}, n={n}]"] = {"model": model["attributes"],
                                                                 "ceiling": ceiling["attributes"]}
    if "nll" in settings.metrics:
        _nll(pipe, settings, report, progress)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(out_dir / "metrics.json", report)

    write_report_html(out_dir / "report.html", report, samples="samples.png" if needs_data else None)
    return report


def _nll(pipe, settings: EvalSettings, report: dict, progress: bool) -> None:
    """NLL in bits per latent dimension of up to NLL_MAX_IMAGES images of --data given their captions
    (evaluate/nll.py); the images are a seeded random subset."""
    if not hasattr(pipe, "schedule"):
        raise CarraraError(f"--metrics nll is the bound of a diffusion model; {settings.model} is not one")
    images, texts = preload_images(load_folder(settings.data, size=pipe.sizes[0]), progress=progress)
    n = min(settings.n, NLL_MAX_IMAGES, len(images))
    pick = sorted(random.Random(settings.seed).sample(range(len(images)), n))
    bpd = latent_nll(pipe, images[pick], [texts[i] for i in pick], seed=settings.seed, progress=progress).numpy()
    c, h, w = pipe.latent_shape()
    mean = lambda a: float(a.mean())
    report["metrics"][f"NLL[bits/dim, latents {c}×{h}×{w} | caption, n={n}, T={pipe.schedule.T}]"] = {
        "value": mean(bpd), "ci95": bootstrap_interval(mean, bpd, n=settings.bootstrap), "n": n}


def _to_pil(images_uint8: torch.Tensor):
    from PIL import Image

    return [Image.fromarray(im.permute(1, 2, 0).numpy(), "RGB") for im in images_uint8]


def format_metrics(report: dict) -> str:
    """One line per number: name, value, interval."""
    lines = []
    for name, m in report["metrics"].items():
        if "value" in m:
            ci = (f" [{m['ci95'][0]:.4g}, {m['ci95'][1]:.4g}]" if "ci95" in m else
                  f" ± {m['std_over_subsets']:.2g}" if "std_over_subsets" in m else "")
            lines.append(f"{name}: {m['value']:.4g}{ci}")
        else:
            lines.append(f"{name}: " + ", ".join(f"{a} {100 * v['accuracy']:.1f}%" for a, v in m["model"].items()))
    return "\n".join(lines)
