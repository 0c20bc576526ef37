"""unCLIP (Ramesh et al. 2022): text → prior → CLIP image embedding z_i → decoder, and the manipulations of §3.

An unCLIP model folder holds, beside its model_index.json (`_class_name` "CarraraUnCLIP", naming the CLIP run and
its weights' fingerprint):

    decoder/   a diffusers-style model folder (unet/, vae/, scheduler/) + image_tokens/ (models/unclip.py)
    prior/     optional: a `carrara train prior` network (text → z_i); without it, only the image manipulations work
    clip/      optional: a copy of the CLIP (else the recorded run is used)

`carrara train decoder` writes such a folder without a prior; `carrara export unclip` joins it to a prior run.
The pipeline (pipeline.py) runs its ordinary denoising loop with `Unclip.conditions` as the U-Net's inputs.

§3's manipulations are operations on z_i, decoded with the same decoder:
- variations (§3.1): z_i of a picture, decoded from new noise;
- interpolation (§3.2): z_θ = slerp(z_i1, z_i2, θ), θ from 0 to 1, decoded from one fixed noise;
- text diffs (§3.3): z_d = norm(z_t − z_t0) for a new caption t and the old one t0 (or the empty one);
  z_θ = slerp(z_i, z_d, θ), θ from 0 to the amount, from one fixed noise.
(The paper fixes the noise by DDIM-inverting the picture; carrara fixes the seed, so the strips share x_T.)
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from carrara.errors import CarraraError
from carrara.fileio import ensure_dir, write_json_atomic
from carrara.images import from_pil
from carrara.modelfolder import read_json_object
from carrara.models.clip import ClipScorer
from carrara.models.unclip import IMAGE_TOKENS, ImageTokens, check_decoder
from carrara.prior import Prior, PriorSettings

KIND = "CarraraUnCLIP"  # model_index.json _class_name of an unCLIP folder
MODES = ("variations", "interpolate", "text_diff")


def is_unclip(path: str | Path) -> bool:
    """True for a folder whose model_index.json names it an unCLIP model."""
    index = Path(path) / "model_index.json"
    return index.is_file() and read_json_object(index).get("_class_name") == KIND


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Spherical interpolation of unit vectors a, b (E,) at θ = t (n,) → (n, E) unit vectors (Shoemake 1985).

    θ = 0 gives a and θ = 1 gives b exactly (coefficients sin ω / sin ω = 1 and sin 0 = 0), so a strip's ends are
    the pictures' own embeddings."""
    a, b = a.float(), b.float()
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1)  # (n, 1)
    omega = torch.arccos((a * b).sum().clamp(-1.0, 1.0))  # the angle between them
    if omega.sin() < 1e-6:  # (anti)parallel: the arc is undefined, the straight line is as good
        return F.normalize((1 - t) * a + t * b, dim=-1)
    return torch.sin((1 - t) * omega) / omega.sin() * a + torch.sin(t * omega) / omega.sin() * b  # (n, E)


def text_diff(image_embed: torch.Tensor, new_text: torch.Tensor, old_text: torch.Tensor,
              thetas: torch.Tensor) -> torch.Tensor:
    """DALL-E 2 §3.3: z_d = norm(z_t − z_t0), z_θ = slerp(z_i, z_d, θ) for each θ (n,) → (n, E)."""
    direction = new_text.float() - old_text.float()
    if direction.norm() < 1e-6:
        raise CarraraError("the new caption and the old one have the same CLIP embedding: no direction to move in")
    return slerp(image_embed, F.normalize(direction, dim=-1), thetas)


class Unclip:
    """What turns a decoder into unCLIP: its image tokens, the CLIP whose space z_i lives in, and the prior."""

    def __init__(self, image_tokens: ImageTokens, scorer: ClipScorer, prior: Prior | None = None, *,
                 decoder: Path | None = None, meta: dict | None = None):
        self.image_tokens, self.scorer, self.prior = image_tokens.eval(), scorer, prior
        self.decoder, self.meta = decoder, meta or {}

    @classmethod
    def load(cls, root: str | Path) -> Unclip:
        """An unCLIP folder (see the module docstring); the CLIP is checked against the fingerprint it records."""
        root = Path(root)
        index = read_json_object(root / "model_index.json")
        if index.get("_class_name") != KIND:
            raise CarraraError(f"{root} is not an unCLIP model folder (model_index.json _class_name is not {KIND})")
        own = _carrara_record(index, root)
        if (root / "clip").is_dir():
            clip = root / "clip"
        elif own.get("clip"):
            clip = Path(own["clip"])
        else:
            raise CarraraError(f"{root}: the unCLIP folder names no CLIP run and holds no clip/")
        prior = Prior.load(root / "prior", clip=clip) if (root / "prior").is_dir() else None
        scorer = prior.scorer if prior is not None else ClipScorer.load(clip)
        if own.get("clip_fingerprint") and scorer.fingerprint() != own["clip_fingerprint"]:
            raise CarraraError(f"the CLIP in {clip} is not the one this decoder was trained on (weights "
                               f"{scorer.fingerprint()}, the decoder expects {own['clip_fingerprint']})")
        tokens = ImageTokens.from_pretrained(root / "decoder" / IMAGE_TOKENS)
        if tokens.config.embed_dim != scorer.model.config.embed_dim:
            raise CarraraError(f"{root}: the decoder takes {tokens.config.embed_dim}-d image embeddings, the CLIP "
                               f"gives {scorer.model.config.embed_dim}-d ones")
        return cls(tokens, scorer, prior, decoder=root / "decoder", meta=own)

    def check(self, unet) -> None:
        """The decoder's U-Net takes this model's z_i and tokens (pipeline.py calls it on load)."""
        check_decoder(unet, self.image_tokens)

    @torch.inference_mode()
    def embed_pictures(self, pictures: list) -> torch.Tensor:
        """Unit CLIP image embeddings (B, E) of PIL pictures (centre-cropped to a square, as generation's inputs)."""
        return self.scorer.model.encode_image(from_pil(pictures, self.scorer.model.config.image_size))

    def manipulate(self, mode: str, pictures: list, n: int, *, new_caption: str = "", old_caption: str = "",
                   amount: float = 0.5) -> tuple[torch.Tensor, list[float]]:
        """The z_i (n, E) of a §3 manipulation and each image's position along it (θ; variations: 0)."""
        if mode not in MODES:
            raise CarraraError(f"unknown unCLIP manipulation {mode!r}; choose one of {', '.join(MODES)}")
        z = self.embed_pictures(pictures)  # (P, E)
        if mode == "variations":
            return z[:1].expand(n, -1), [0.0] * n
        if mode == "interpolate":
            thetas = torch.linspace(0.0, 1.0, n)
            return slerp(z[0], z[1], thetas), thetas.tolist()
        thetas = torch.linspace(0.0, amount, n) if n > 1 else torch.tensor([amount])
        new, old = self.scorer.embed_texts([new_caption, old_caption])  # (2, E)
        return text_diff(z[0], new, old, thetas), thetas.tolist()

    def manipulation_inputs(self, mode: str, pictures: list, n: int, record: dict,
                            seed: int) -> tuple[dict, list[dict]]:
        """(Pipeline keyword arguments, each image's record) of n images of a manipulation from `seed`, for the CLI
        and the server alike: variations from new noise (image i from seed + i), strips (interpolation, text diff)
        from the one seed's noise, each image with its θ. record: the manipulation's captions and amount."""
        embeds, thetas = self.manipulate(mode, pictures, n, new_caption=record.get("new_caption", ""),
                                         old_caption=record.get("old_caption", ""), amount=record.get("amount", 0.5))
        strip = mode != "variations"
        per_image = [{"seed": seed + (0 if strip else i), **({"theta": round(t, 6)} if strip else {})}
                     for i, t in enumerate(thetas)]
        return {"image_embeds": embeds, "same_noise": strip}, per_image

    def conditions(self, prompts: list[str], states: torch.Tensor, null_states: torch.Tensor,
                   image_embeds: torch.Tensor | None = None, *, seed: int = 0,
                   prior_guidance: float | None = None) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The decoder's (cond, uncond) inputs: (context, class_labels) with z_i and with z_i = 0.

        z_i is given (variations and their kin), or sampled by the prior from the prompts (image i from seed + i,
        at the prior's guidance scale)."""
        b = states.shape[0]
        if image_embeds is None:
            image_embeds = self.sample_prior(prompts, seed=seed, guidance=prior_guidance)
        e = self.image_tokens.config.embed_dim
        if image_embeds.shape != (b, e):
            raise CarraraError(f"give one {e}-d image embedding per prompt ({b}), got {tuple(image_embeds.shape)}")
        with torch.inference_mode():
            cond = self.image_tokens(states, F.normalize(image_embeds.float(), dim=-1))
            uncond = self.image_tokens(null_states, torch.zeros(null_states.shape[0], e))
        return cond, uncond

    def sample_prior(self, prompts: list[str], *, seed: int = 0, guidance: float | None = None) -> torch.Tensor:
        """One z_i (B, E) per prompt from the prior, with its recorded sampling settings (guidance: its own scale),
        the best of its `candidates` draws by z_i · z_t (DALL-E 2 §2.2); a folder that records none takes two."""
        if self.prior is None:
            raise CarraraError("this unCLIP folder has no prior/, so it cannot draw from text: join one with "
                               "`carrara export unclip --decoder RUN --prior PRIOR_RUN --out MODEL` "
                               "(--variations, --interpolate and --text-diff work without it)")
        recorded = self.prior.meta.get("sample", {})
        if not isinstance(recorded, dict):
            raise CarraraError("the prior's folder records its sampling settings wrongly (sample is not a table)")
        settings = PriorSettings.parse({**recorded, **({} if guidance is None else {"guidance": guidance})},
                                       where="unCLIP prior", strict=False)
        return self.prior.pick(prompts, seed=seed, candidates=settings.candidates, guidance=settings.guidance,
                               steps=settings.steps, sampler=settings.sampler)  # (B, E)

    @property
    def prior_settings(self) -> dict:
        """The prior's sampling settings as recorded in its folder (for PNG metadata)."""
        return dict(self.prior.meta.get("sample", {})) if self.prior is not None else {}


def _carrara_record(index: dict, root: Path) -> dict:
    """The "carrara" object of an unCLIP folder's model_index.json (the CLIP run it names), checked for its shape."""
    own = index.get("carrara", {})
    if not isinstance(own, dict) or not isinstance(own.get("clip", ""), str):
        raise CarraraError(f"{root / 'model_index.json'}: \"carrara\" must name the CLIP run as {{\"clip\": …}}")
    return own


def write_index(root: Path, *, clip: str, clip_fingerprint: str, extra: dict | None = None) -> None:
    """model_index.json of an unCLIP folder."""
    write_json_atomic(Path(root) / "model_index.json", {
        "_class_name": KIND, "decoder": ["carrara", "UnclipDecoder"],
        "carrara": {"clip": clip, "clip_fingerprint": clip_fingerprint, **(extra or {})}})


def assemble_unclip(decoder: str | Path, prior: str | Path, out: str | Path) -> Path:
    """An unCLIP model folder from a decoder run and a prior run trained on the same CLIP, with a copy of that CLIP.

    Written into a temporary folder and renamed, so `out` is complete or absent."""
    decoder, prior, out = Path(decoder), Path(prior), Path(out)
    if not is_unclip(decoder):
        raise CarraraError(f"{decoder} is not an unCLIP decoder run (train one with `carrara train decoder`)")
    prior_dir = prior / "prior" if (prior / "prior").is_dir() else prior
    if not (prior_dir / "config.json").is_file():
        raise CarraraError(f"{prior} is not a prior run (train one with `carrara train prior`)")
    if out.exists():
        raise CarraraError(f"{out} already exists; remove it or pick another --out")
    own = _carrara_record(read_json_object(decoder / "model_index.json"), decoder)
    prior_meta = read_json_object(prior_dir / "config.json")
    if prior_meta.get("clip_fingerprint") != own.get("clip_fingerprint"):
        raise CarraraError(f"the prior {prior} and the decoder {decoder} were trained on different CLIPs "
                           f"({prior_meta.get('clip_fingerprint')} vs {own.get('clip_fingerprint')})")
    clip = decoder / "clip" if (decoder / "clip").is_dir() else Path(own.get("clip", ""))
    clip_dir = clip / "clip" if (clip / "clip").is_dir() else clip
    if not (clip_dir / "config.json").is_file():
        raise CarraraError(f"the decoder's CLIP {clip} is gone: the unCLIP folder needs it")
    tmp = ensure_dir(out.parent) / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        shutil.copytree(decoder / "decoder", tmp / "decoder")
        shutil.copytree(prior_dir, tmp / "prior")
        (tmp / "clip").mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy2(clip_dir / name, tmp / "clip" / name)
        write_index(tmp, clip="clip", clip_fingerprint=own.get("clip_fingerprint", ""),
                    extra={"decoder_run": str(decoder.resolve()), "prior_run": str(prior.resolve())})
        tmp.rename(out)
    except OSError as e:  # a full disk, a file that cannot be read: no half-copied folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise CarraraError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
