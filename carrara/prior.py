"""Sampling the unCLIP prior: prompts → CLIP image embeddings (Ramesh et al. 2022, §2.2), and how to check them.

The network is models/prior.py; this layer joins it to the CLIP it was trained on (models/clip.py) and to carrara's
samplers (diffusion/samplers.py, prediction_type "sample": the network predicts the clean embedding). Embeddings are
L2-normalised and scaled by √E for the diffusion, as DALLE2-pytorch does (`image_embed_scale = dim ** 0.5`, after
Katherine Crowson's note that a unit vector is too small a signal for noise of variance 1); samples are scaled back
and normalised again. Image j of a call (prompt j // n, sample j % n) draws from a generator seeded seed + j.

The check (`prior_check`) is the quantity DALL-E 2 reasons with: how close a sampled z_i is to the real image
embedding of the caption's image, against how close it is to random images; the text embedding z_t itself is the
baseline a prior must beat (CLIP's text and image embeddings occupy different regions of the sphere).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from carrara.diffusion.guidance import cfg_model
from carrara.diffusion.samplers import get_sampler, sampling_plan
from carrara.diffusion.schedule import NoiseSchedule
from carrara.diffusion.settings import SAMPLER_NAMES
from carrara.errors import CarraraError
from carrara.models.clip import ClipScorer
from carrara.models.prior import Condition, DiffusionPriorNetwork
from carrara.text.encoder import mean_pool

MAX_PER_CALL = 4096  # sampled embeddings per call: a batch of (B, S, W) activations, far below memory limits
CANDIDATE_STRIDE = 1_000_003  # candidate k of a draw from seed s starts from seed s + k·stride (k = 0: s itself)


@dataclass
class PriorSettings:
    """How the prior samples by default: Karlo's unCLIP prior settings (25 steps, w = 4), DDIM on the cosine grid."""

    steps: int = 25
    sampler: str = "ddim"
    guidance: float = 4.0
    candidates: int = 2  # DALL-E 2 §2.2: draw two z_i, keep the one with the larger z_i · z_t (1: the first draw)

    @classmethod
    def parse(cls, d: dict, *, where: str, strict: bool = True) -> PriorSettings:
        """Settings from a recipe's or a folder's `sample` table, checked: one CarraraError naming `where` for a
        wrong type or range (strict: an unknown key too; a folder's extra keys are skipped, for newer folders)."""
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if strict and unknown:
            raise CarraraError(f"{where}: unknown prior sampling setting {unknown[0]!r}; "
                               f"known: {', '.join(cls.__dataclass_fields__)}")
        s = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        checks = ((isinstance(s.steps, int) and not isinstance(s.steps, bool) and 1 <= s.steps <= 1000,
                   f"steps must be an integer in [1, 1000], got {s.steps!r}"),
                  (s.sampler in SAMPLER_NAMES, f"sampler must be one of {', '.join(SAMPLER_NAMES)}, got {s.sampler!r}"),
                  (isinstance(s.guidance, (int, float)) and not isinstance(s.guidance, bool)
                   and 0.0 <= s.guidance <= 100.0, f"guidance must be a number in [0, 100], got {s.guidance!r}"),
                  (isinstance(s.candidates, int) and not isinstance(s.candidates, bool) and 1 <= s.candidates <= 16,
                   f"candidates must be an integer in [1, 16], got {s.candidates!r}"))
        for ok, message in checks:
            if not ok:
                raise CarraraError(f"{where}: prior {message}")
        return s


def trim(states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns no caption uses: (B, L, D), (B, L) → (B, L', D), (B, L') (the output is unchanged)."""
    length = max(int(mask.sum(1).max()), 1) if len(mask) else 1
    return states[:, :length], mask[:, :length]


@torch.inference_mode()
def encode_captions(scorer: ClipScorer, texts: list[str], batch_size: int = 256) -> tuple[torch.Tensor, ...]:
    """The prior's text inputs: MiniLM token states (B, L, D) in bf16 (as training caches them: 2 bytes a number for
    tens of thousands of captions), their mask (B, L), CLIP text embeddings (B, E) in fp32."""
    states, masks, embeds = [], [], []
    for i in range(0, len(texts), batch_size):
        s, m = scorer.text_encoder.encode(texts[i:i + batch_size])  # (b, L, D), (b, L)
        states.append(s.to(torch.bfloat16))
        masks.append(m.bool())
        embeds.append(scorer.model.encode_text(mean_pool(s.float(), m, normalize=False)))
    return torch.cat(states), torch.cat(masks), torch.cat(embeds)


def null_condition(cond: Condition) -> Condition:
    """The unconditional input of a batch-1 condition shaped like `cond`: keep = 0 (the network's null tokens)."""
    states, mask, text_embed, _ = cond
    length = states.shape[1]
    return (states.new_zeros(1, *states.shape[1:]), torch.arange(length, device=mask.device)[None] == 0,
            text_embed.new_zeros(1, text_embed.shape[1]), text_embed.new_zeros(1))


@torch.no_grad()
def sample_embeddings(network: DiffusionPriorNetwork, schedule: NoiseSchedule, cond: Condition, *, seed: int = 0,
                      guidance: float = PriorSettings.guidance, steps: int = PriorSettings.steps,
                      sampler: str = PriorSettings.sampler, seeds: list[int] | None = None) -> torch.Tensor:
    """One unit image embedding (B, E) per row of `cond`; row j starts from x_T drawn by the generator seed + j
    (or seeds[j])."""
    n, e = cond[0].shape[0], network.config.embed_dim
    gens = [torch.Generator().manual_seed(seed + j if seeds is None else seeds[j]) for j in range(n)]
    x_T = torch.cat([torch.randn(1, e, generator=g) for g in gens])  # (B, E) ~ N(0, I)
    model = cfg_model(network, cond, null_condition(cond), guidance)  # x̂0 = uncond + w (cond − uncond)
    timesteps, options = sampling_plan(sampler, schedule, steps)
    x0 = get_sampler(sampler)(model, x_T, schedule, timesteps, prediction_type="sample", generator=gens, **options)
    return F.normalize(x0.float(), dim=-1)  # the scale √E divides out in the normalisation   (B, E)


def pick_embeddings(network: DiffusionPriorNetwork, schedule: NoiseSchedule, cond: Condition, *, seed: int = 0,
                    candidates: int = PriorSettings.candidates, guidance: float = PriorSettings.guidance,
                    steps: int = PriorSettings.steps, sampler: str = PriorSettings.sampler) -> torch.Tensor:
    """One unit z_i (B, E) per row of `cond`, the best of `candidates` draws by z_i · z_t (DALL-E 2 §2.2: "we sample
    two copies of z_i from the prior and pick the one with a higher dot product with z_t").

    Row j's candidate k starts from seed + j + k·CANDIDATE_STRIDE, so row j's pick depends on seed + j only (image i
    of a batch is image 0 of a call from seed + i), and candidates = 1 is `sample_embeddings`' own draw."""
    if not 1 <= candidates <= 16:
        raise CarraraError(f"prior candidates must be between 1 and 16, got {candidates}")
    B = cond[0].shape[0]
    rows = tuple(c.repeat(candidates, *([1] * (c.ndim - 1))) for c in cond)  # row k·B + j: row j, draw k
    seeds = [seed + j + k * CANDIDATE_STRIDE for k in range(candidates) for j in range(B)]
    z = sample_embeddings(network, schedule, rows, guidance=guidance, steps=steps, sampler=sampler,
                          seeds=seeds).view(candidates, B, -1)  # (K, B, E)
    best = (z * cond[2].float()[None]).sum(-1).argmax(0)  # (B,) the draw nearest its caption's z_t
    return z[best, torch.arange(B)]


class Prior:
    """A trained prior (its EMA network and noise schedule) and the CLIP whose embedding space it samples."""

    def __init__(self, network: DiffusionPriorNetwork, schedule: NoiseSchedule, scorer: ClipScorer, meta: dict):
        self.network, self.schedule, self.scorer, self.meta = network.eval(), schedule, scorer, meta

    @classmethod
    def load(cls, run: str | Path, clip: str | Path | None = None) -> Prior:
        """A `carrara train prior` run (or its prior/ folder); the CLIP is the run's own unless `clip` is given."""
        run = Path(run)
        if not run.exists():
            raise CarraraError(f"prior {run}: no such folder")
        network, meta = DiffusionPriorNetwork.from_pretrained(run / "prior" if (run / "prior").is_dir() else run)
        clip_run = Path(clip or meta.get("clip", ""))
        if not str(clip or meta.get("clip", "")):
            raise CarraraError(f"{run}: the prior does not name its CLIP run; pass the CLIP it was trained on")
        scorer = ClipScorer.load(clip_run)
        if meta.get("clip_fingerprint") and scorer.fingerprint() != meta["clip_fingerprint"]:
            raise CarraraError(f"the CLIP in {clip_run} is not the one this prior was trained on (weights "
                               f"{scorer.fingerprint()}, the prior expects {meta['clip_fingerprint']})")
        schedule = NoiseSchedule.from_config(meta.get("schedule", "cosine"), int(meta.get("num_train_timesteps", 1000)),
                                             prediction_type="sample")
        return cls(network, schedule, scorer, meta)

    def condition(self, prompts: list[str]) -> Condition:
        """The conditional input for `prompts`: token states, mask, CLIP text embeddings, keep = 1."""
        states, mask, text_embed = encode_captions(self.scorer, prompts)
        states, mask = trim(states, mask)
        return states, mask, text_embed, torch.ones(len(prompts))

    def sample(self, prompts: list[str], *, n: int = 1, seed: int = 0, guidance: float = PriorSettings.guidance,
               steps: int = PriorSettings.steps, sampler: str = PriorSettings.sampler) -> torch.Tensor:
        """n unit image embeddings per prompt, (P, n, E): sample k of prompt p comes from seed + p·n + k."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or n < 1 or len(prompts) * n > MAX_PER_CALL:
            raise CarraraError(f"prior: give 1…{MAX_PER_CALL} embeddings per call (prompts × n), "
                               f"got {len(prompts)} × {n}")
        cond = tuple(c.repeat_interleave(n, dim=0) for c in self.condition(list(prompts)))
        out = sample_embeddings(self.network, self.schedule, cond, seed=seed, guidance=guidance, steps=steps,
                                sampler=sampler)
        return out.view(len(prompts), n, -1)

    def pick(self, prompts: list[str], *, seed: int = 0, candidates: int = PriorSettings.candidates,
             guidance: float = PriorSettings.guidance, steps: int = PriorSettings.steps,
             sampler: str = PriorSettings.sampler) -> torch.Tensor:
        """One unit z_i (P, E) per prompt, the best of `candidates` draws (`pick_embeddings`)."""
        if not prompts or len(prompts) * candidates > MAX_PER_CALL:
            raise CarraraError(f"prior: give 1…{MAX_PER_CALL // max(candidates, 1)} prompts per call, got {len(prompts)}")
        return pick_embeddings(self.network, self.schedule, self.condition(list(prompts)), seed=seed,
                               candidates=candidates, guidance=guidance, steps=steps, sampler=sampler)


def prior_check(sampled: torch.Tensor, true_image: torch.Tensor, pool: torch.Tensor, hits: torch.Tensor, *,
                text_embed: torch.Tensor | None = None, ks: tuple[int, ...] = (1, 5)) -> dict:
    """How well sampled image embeddings (M, E) match their captions' images.

    true_image (M, E): the real image embedding of each caption's image; pool (N, E): the images searched;
    hits (M, N) bool: which pool images count as the caption's own (images sharing the caption).
    cos_true − cos_random is the prior's signal; cos_text_true is the same for z_t used directly as z_i;
    top-k is text→image retrieval with the sampled embedding as the query.
    """
    sim = sampled @ pool.T  # (M, N)
    out = {"n": len(sampled), "pool": len(pool),
           "cos_true": float((sampled * true_image).sum(-1).mean()),
           "cos_random": float(sim.mean())}  # the expected cosine to an image drawn at random from the pool
    if text_embed is not None:
        out["cos_text_true"] = float((text_embed * true_image).sum(-1).mean())
        out["cos_text_random"] = float((text_embed @ pool.T).mean())
    for k in ks:
        top = sim.topk(min(k, len(pool)), dim=1).indices  # (M, k)
        out[f"top{k}"] = float(hits.gather(1, top).any(1).float().mean())
        out[f"top{k}_chance"] = chance_top_k(hits, min(k, len(pool)))
    return out


def chance_top_k(hits: torch.Tensor, k: int) -> float:
    """Top-k accuracy of a query that ranks the pool at random: 1 − C(N − h, k) / C(N, k), averaged over rows."""
    n = hits.shape[1]
    return float(sum(1.0 - math.comb(n - int(h), k) / math.comb(n, k) for h in hits.sum(1).tolist()) / len(hits))
