"""unCLIP in `carrara serve`: DALL-E 2 §3's manipulations of pictures (variations, interpolation, text diffs) as
POST /api/unclip, and the prior's guidance scale on POST /api/generate's text → prior → decoder route.

The manipulations have an endpoint of their own, not more fields on /api/generate: their prompt is optional (and for
a text diff it is the picture's old caption, not the decoder's text), they take one or two pictures instead of an
init image and a mask, and a strip's images all start from one seed's noise, so such a job never shares a pipeline
call. The job itself goes through the same queue and gallery as every other (serve/jobs.py); the pictures' CLIP
embeddings are taken by the worker, on the loaded model, just before its pipeline call (`unclip_inputs`). The images
carry `carrara generate --variations/--interpolate/--text-diff`'s PNG records: `unclip` (the mode, each picture's
source and SHA-256, the captions and amount) and each image's `theta` and seed.
"""
from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from carrara.diffusion.settings import GenerationSettings
from carrara.errors import CarraraError
from carrara.serve.gallery import Gallery
from carrara.serve.schema import JobInfo, UnclipRequest, error_response
from carrara.serve.uploads import UploadError, decode_data_url, from_gallery

GALLERY_ID = re.compile(r"[0-9a-f]{32}")
NOT_UNCLIP = ("is not an unCLIP model: variations, interpolate and text_diff need one (carrara train decoder, "
              "carrara export unclip)")


class RequestError(ValueError):
    """A request the chosen model cannot run, in one line naming the field (the API answers 422)."""


@dataclass
class UnclipJob:
    """What a job adds to an unCLIP model's pipeline call: a §3 manipulation of pictures, or the prior's guidance."""

    mode: str | None = None  # "variations", "interpolate", "text_diff" (carrara/unclip.py MODES); None: from text
    pictures: list[Image.Image] = field(default_factory=list)
    record: dict = field(default_factory=dict)  # the PNGs' "unclip" record (as `carrara generate` writes it)
    prior_guidance: float | None = None  # the text route: the prior's own guidance scale (None: its recorded one)

    def batch_key(self, job_id: str) -> tuple:
        """A manipulation runs alone (a strip shares one seed's noise); text jobs share calls at one prior scale."""
        return ("manipulation", job_id) if self.mode else ("prior", self.prior_guidance)

    def describe(self) -> dict:
        """What GET /api/jobs/{id} says of it."""
        return dict(self.record) if self.mode else {"prior_guidance": self.prior_guidance}


def unclip_info(pipe) -> dict | None:
    """GET /api/model's `unclip`: None for other models, else whether it draws from text (a prior) and how."""
    unclip = getattr(pipe, "unclip", None)
    if unclip is None:
        return None
    return {"prior": unclip.prior is not None, "prior_settings": unclip.prior_settings}


def prior_job(body, info: dict) -> UnclipJob | None:
    """The unCLIP part of a POST /api/generate (`info`: GET /api/model's answer for its model), or RequestError."""
    unclip = info.get("unclip")
    if unclip is None:
        if body.prior_guidance is not None:
            raise RequestError(f"prior_guidance: steers an unCLIP model's prior; {info['name']} is not an unCLIP "
                               "model")
        return None
    if not unclip["prior"]:
        raise RequestError(f"model: {info['name']} has no prior, so it cannot draw from text: POST /api/unclip makes "
                           "variations, interpolations and text diffs of pictures")
    return UnclipJob(prior_guidance=body.prior_guidance)


def read_picture(ref: str, field_name: str, gallery: Gallery) -> tuple[Image.Image, dict]:
    """A picture given as a data URL or a gallery image id, and how the PNG records name it (source, SHA-256)."""
    if GALLERY_ID.fullmatch(ref):
        picture, digest = from_gallery(gallery, ref, field_name)
        source = f"gallery:{ref}"
    elif ref.startswith("data:"):
        picture, digest = decode_data_url(ref, field_name)
        source = "upload"
    else:
        raise UploadError(f'{field_name}: not a gallery image id or a PNG or JPEG data URL ("data:image/png;base64,…")')
    return picture, {"source": source, "sha256": digest[:16]}  # 16 hex, as `carrara generate` records a file


def read_manipulation(body: UnclipRequest, gallery: Gallery) -> UnclipJob:
    """The pictures of a POST /api/unclip, decoded and checked (UploadError: one line), and the job's record."""
    refs = [("variations", body.variations)] if body.interpolate is None else \
        [(f"interpolate.{k}", ref) for k, ref in enumerate(body.interpolate)]
    read = [read_picture(ref, name, gallery) for name, ref in refs]
    record = {"mode": body.mode, "images": [r for _, r in read]}
    if body.mode == "text_diff":
        record.update(new_caption=body.text_diff, old_caption=body.prompt, amount=body.strip_amount)
    return UnclipJob(body.mode, [picture for picture, _ in read], record)


def unclip_inputs(pipe, unclip: UnclipJob | None, n: int, seed: int) -> tuple[dict, list[dict]]:
    """(pipeline keyword arguments, each image's extra PNG metadata) of a batch of n images from `seed`, as `carrara generate`
    makes them (both through `Unclip.manipulation_inputs`), or on an unCLIP model the prior's settings."""
    model = getattr(pipe, "unclip", None)
    if model is None:
        if unclip is not None:
            raise CarraraError(f"{pipe.name} {NOT_UNCLIP}")
        return {}, [{}] * n
    if unclip is None or unclip.mode is None:
        w = None if unclip is None else unclip.prior_guidance
        record = {"prior": {**model.prior_settings, **({} if w is None else {"guidance": w})}}
        return ({} if w is None else {"prior_guidance": w}), [record] * n
    kwargs, per_image = model.manipulation_inputs(unclip.mode, unclip.pictures, n, unclip.record, seed)
    return kwargs, [{"unclip": unclip.record, **record} for record in per_image]


def unclip_router(gallery: Gallery, requested_model: Callable[[str | None], Awaitable[dict | JSONResponse]],
                  enqueue: Callable[..., object]) -> APIRouter:
    """POST /api/unclip. requested_model: GET /api/model's answer for a job's model name (loading it), or the
    422 / 503 answer; enqueue: settings and the job's options → the queued job's JobInfo (or the 429 / 503 answer)."""
    router = APIRouter()

    @router.post("/api/unclip", status_code=202, response_model=JobInfo,
                 responses={422: {"description": "a bad picture, or a model that is not unCLIP"},
                            429: {"description": "queue full; see Retry-After"}})
    async def manipulate(body: UnclipRequest):
        """Queue variations of a picture, an interpolation strip between two, or a text diff of one (DALL-E 2 §3);
        poll GET /api/jobs/{id} or stream its events, as for /api/generate."""
        info = await requested_model(body.model)
        if isinstance(info, JSONResponse):
            return info
        if info.get("unclip") is None:
            return error_response(422, f"model: {info['name']} {NOT_UNCLIP}", "model")
        try:
            unclip = await run_in_threadpool(read_manipulation, body, gallery)
        except UploadError as e:
            return error_response(422, str(e), str(e).split(":")[0])
        settings = GenerationSettings(body.decoder_prompt, body.negative_prompt, body.steps, body.sampler,
                                      body.guidance, 0 if body.seed == "random" else body.seed)
        return enqueue(settings, n=body.images, random_seed=body.seed == "random", model=body.model, unclip=unclip)

    return router
