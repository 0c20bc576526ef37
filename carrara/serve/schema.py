"""The JSON bodies of `carrara serve`'s API as pydantic models: FastAPI validates requests (422) and writes the
OpenAPI schema from them. Defaults and limits are the generation settings' own (diffusion/settings.py) and the
pipeline's batch limit.
"""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from carrara.diffusion.settings import DEFAULTS, MAX_GUIDANCE, MAX_STEPS, SAMPLER_NAMES, GenerationSettings
from carrara.errors import CarraraError
from carrara.pipeline import MAX_BATCH

MAX_PROMPT_CHARS = 1000
MAX_SEED = 2**53 - 1  # the largest integer JavaScript numbers hold exactly
MAX_SIZE = 4096
# One request's work: steps × n U-Net passes of one image (two with guidance). 1280 = the default 20 steps for the
# largest batch (64 images), or 1000 steps for one image: tens of seconds of the default model on a 2-core CPU (docs/
# serve.md), so one request cannot hold the only worker for an hour (n = 64 at 1000 steps would be 64,000).
MAX_WORK = 1280
MAX_MODEL_NAME = 200
MAX_IMAGE_BYTES = 2 * 2**20  # one picture to edit; the page sends the model's size, a few KB (serve/uploads.py)
MAX_DATA_URL = 40 + (MAX_IMAGE_BYTES + 2) // 3 * 4  # its base64 data URL
SEARCH_K, MAX_SEARCH_K = 8, 64  # images a search returns: by default (as `carrara search --k`), at most
MAX_PRIOR_GUIDANCE = 100.0  # carrara/unclip.py's bound on the prior's guidance scale
INTERPOLATE_N = 5  # images of an interpolation strip when n is not given (as `carrara generate --interpolate`)


def seed_in_range(seed):
    """A request's seed: a whole number from 0 to MAX_SEED, or "random"."""
    if seed != "random" and (type(seed) is not int or not 0 <= seed <= MAX_SEED):
        raise ValueError(f'the seed must be a whole number from 0 to {MAX_SEED}, or "random"')
    return seed


class GenerateRequest(BaseModel):
    """The body of POST /api/generate; every field but the prompt defaults as in `carrara generate`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what to draw")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description='the unconditional branch; "" = null')
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description=(
        f"null: the model's own (GET /api/model: {DEFAULTS.steps}, a distilled student's few)"))
    sampler: Literal[SAMPLER_NAMES] | None = Field(None, description=(
        f"null: the model's own ({DEFAULTS.sampler!r}; a distilled student's 'lcm')"))
    guidance: float = Field(DEFAULTS.guidance, ge=0.0, le=MAX_GUIDANCE, description="classifier-free guidance w")
    seed: int | Literal["random"] = Field(
        0, description=f'0 … {MAX_SEED}; image i uses seed + i; "random" picks one when the job runs')
    n: int = Field(1, ge=1, le=MAX_BATCH, description="number of images")
    draft: bool = Field(False, description=(
        "a live preview (the page asks for one while the prompt is typed): one image, run before queued jobs, "
        "returned in the job as a PNG data URL (draft_image) and not kept in the gallery"))
    width: int | None = Field(None, ge=1, le=MAX_SIZE, description="one of the model's sizes (GET /api/model)")
    height: int | None = Field(None, ge=1, le=MAX_SIZE, description="equal to width if both are given")
    model: str | None = Field(None, max_length=MAX_MODEL_NAME,
                              description="a name from GET /api/models; null: the model the server started with")
    init_image: str | None = Field(None, max_length=MAX_DATA_URL, description=(
        'img2img: a picture to edit, as a data URL "data:image/png;base64,…" (PNG or JPEG, at most 2 MiB, 4096 '
        "pixels a side; centre-cropped to a square and resized to the model's side)"))
    init_image_id: str | None = Field(None, pattern=r"^[0-9a-f]{32}$",
                                      description="img2img: the id of a gallery image to edit, instead of init_image")
    mask: str | None = Field(None, max_length=MAX_DATA_URL, description=(
        "inpainting: a PNG data URL the size of the init image; white = regenerate, black = keep"))
    strength: float | None = Field(None, gt=0.0, le=1.0, description=(
        "how much of the sampling plan an edit runs, (0, 1]; null: 0.8 for img2img, 1.0 for inpainting"))
    prior_guidance: float | None = Field(None, ge=0.0, le=MAX_PRIOR_GUIDANCE, description=(
        "an unCLIP model's prior (text → CLIP image embedding): its guidance scale; null: the one it recorded"))

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        return prompt

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_in_range(cls, seed):
        return seed_in_range(seed)

    @model_validator(mode="after")
    def _valid_settings(self) -> GenerateRequest:
        try:
            self.settings().validate()
        except CarraraError as e:
            raise ValueError(str(e).replace("--", "")) from None
        if self.seed != "random" and self.seed + self.n - 1 > MAX_SEED:
            raise ValueError(f"seed + n - 1 must be at most {MAX_SEED}")
        if self.init_image is not None and self.init_image_id is not None:
            raise ValueError("give init_image or init_image_id, not both")
        edit = self.init_image is not None or self.init_image_id is not None
        if not edit and (self.mask is not None or self.strength is not None):
            raise ValueError(f"{'mask' if self.mask is not None else 'strength'} needs an init image to edit "
                             "(init_image or init_image_id)")
        steps = self.steps or DEFAULTS.steps  # a model's own steps are at most the defaults' (a student's are 4)
        if steps * self.n > MAX_WORK:
            raise ValueError(f"steps × n must be at most {MAX_WORK} (one request's work), got {steps} × {self.n} "
                             f"= {steps * self.n}: ask for fewer steps or fewer images")
        if self.draft and self.n != 1:
            raise ValueError(f"a draft is one image (n = 1), got n = {self.n}")
        return self

    def settings(self, model_defaults: dict | None = None) -> GenerationSettings:
        """The generation settings, steps and sampler the model's own where the request names none."""
        own = {"steps": DEFAULTS.steps, "sampler": DEFAULTS.sampler, **(model_defaults or {})}
        seed = 0 if self.seed == "random" else self.seed
        return GenerationSettings(self.prompt, self.negative_prompt, self.steps or own["steps"],
                                  self.sampler or own["sampler"], self.guidance, seed, self.width or self.height)


def field_range(name: str) -> tuple[float, float] | None:
    """(lowest, highest) a numeric field of a request body allows, read from its Field(ge=…, le=…)."""
    field = GenerateRequest.model_fields.get(name) or SearchRequest.model_fields.get(name) or \
        UnclipRequest.model_fields.get(name)
    if field is None:
        return None
    low = next((m.ge for m in field.metadata if getattr(m, "ge", None) is not None), None)
    high = next((m.le for m in field.metadata if getattr(m, "le", None) is not None), None)
    return None if low is None or high is None else (low, high)


class JobSettings(BaseModel):
    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    guidance: float
    seed: int | None = Field(description="null while a random-seed job waits")
    n: int
    size: int | None = Field(None, description="the image side asked for; null: the model's largest")
    model: str | None = Field(None, description="the model it runs on (GET /api/models); null in images made "
                              "before the server offered several")
    edit: Literal["img2img", "inpaint"] | None = Field(None, description="null: text to image")
    strength: float | None = Field(None, description="an edit's strength")
    init_image: str | None = Field(None, description='an edit\'s picture: "upload" or "gallery:<id>"')


class ImageItem(BaseModel):
    """A gallery image: `settings` remake it (n = 1, its own seed), as does its PNG's metadata."""

    id: str
    url: str
    created: float
    job_id: str
    settings: JobSettings
    model: str
    model_hash: str
    size: list[int]
    unclip: dict | None = Field(None, description=(
        "made by POST /api/unclip: the mode, each picture's source and SHA-256, the captions, amount and its theta"))


class JobInfo(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "cancelled", "failed"]
    position: int | None = Field(description="place in the queue (1 = next), null once it runs")
    step: int
    total: int
    settings: JobSettings
    images: list[ImageItem]
    error: str | None
    created: float
    started: float | None
    finished: float | None
    batch_jobs: int = Field(description="how many jobs shared its pipeline call (0 until it runs)")
    events_url: str
    unclip: dict | None = Field(None, description=(
        "an unCLIP job: its manipulation (mode, pictures, captions, amount) or the prior's guidance; null: none"))
    draft: bool = Field(False, description="a live preview: its image is draft_image, not in the gallery")
    draft_image: str | None = Field(None, description="a finished draft's image, a PNG data URL")


class GalleryPage(BaseModel):
    items: list[ImageItem]
    total: int
    offset: int
    limit: int
    skipped: int = Field(description="files in the gallery folder that could not be read at start-up (not listed)")


class SearchRequest(BaseModel):
    """The body of POST /api/search: one query (words, a picture, or a gallery image) and how many images."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="words, embedded by the CLIP text tower")
    image: str | None = Field(None, max_length=MAX_DATA_URL, description=(
        'a picture as a data URL "data:image/png;base64,…" (PNG or JPEG, at most 2 MiB), embedded by the image '
        "tower"))
    image_id: str | None = Field(None, pattern=r"^[0-9a-f]{32}$", description=(
        "a gallery image's id: the training images nearest to a generated picture (a memorisation check)"))
    k: int = Field(SEARCH_K, ge=1, le=MAX_SEARCH_K, description="how many images (fewer if the index holds fewer)")

    @field_validator("text")
    @classmethod
    def _not_blank(cls, text: str | None) -> str | None:
        if text is not None and not text.strip():
            raise ValueError("the search text is empty")
        return text

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        given = [name for name in ("text", "image", "image_id") if getattr(self, name) is not None]
        if len(given) != 1:
            both = f", not {' and '.join(given)}" if given else ""
            raise ValueError(f"give one query: text, image or image_id{both}")
        return self


class SearchHit(BaseModel):
    rank: int = Field(description="1 = nearest")
    score: float = Field(description="cosine similarity of the CLIP embeddings, in [-1, 1]")
    file: str = Field(description="the image's path in the indexed folder")
    text: str = Field(description="its caption")
    url: str = Field(description="GET it: /api/search/image/{i}, i its place in the index")


class SearchResult(BaseModel):
    results: list[SearchHit]
    ms: float = Field(description="query time in milliseconds: embedding the query and the kNN search")


Picture = Annotated[str, Field(max_length=MAX_DATA_URL)]


class UnclipRequest(BaseModel):
    """The body of POST /api/unclip (serve/unclip.py): one of DALL-E 2 §3's manipulations, as `carrara generate
    --variations / --interpolate / --text-diff` makes them; every other field defaults as there."""

    model_config = ConfigDict(extra="forbid", strict=True)
    variations: Picture | None = Field(None, description=(
        'variations of a picture: a gallery image id, or a data URL "data:image/png;base64,…" (PNG or JPEG, at most '
        "2 MiB); with text_diff, the picture to move"))
    interpolate: list[Picture] | None = Field(None, min_length=2, max_length=2, description=(
        "a strip from the first picture to the second (slerp of their CLIP embeddings, one noise): two pictures"))
    text_diff: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description=(
        "with variations: the new caption t; the picture's embedding moves toward norm(z_t − z_t0)"))
    amount: float | None = Field(None, ge=0.0, le=1.0, description="with text_diff: how far, θ in [0, 1] (0.5)")
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description=(
        "the decoder's text (variations, interpolate); with text_diff, the picture's old caption t0"))
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    steps: int = Field(DEFAULTS.steps, ge=1, le=MAX_STEPS)
    sampler: Literal[SAMPLER_NAMES] = DEFAULTS.sampler
    guidance: float = Field(DEFAULTS.guidance, ge=0.0, le=MAX_GUIDANCE, description="the decoder's guidance w")
    seed: int | Literal["random"] = Field(0, description=(
        'variations: image i uses seed + i; a strip: every image the noise of seed; "random" picks one'))
    n: int | None = Field(None, ge=1, le=MAX_BATCH, description=f"images (null: {INTERPOLATE_N} for interpolate, else 1)")
    model: str | None = Field(None, max_length=MAX_MODEL_NAME, description="an unCLIP model from GET /api/models")

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_in_range(cls, seed):
        return seed_in_range(seed)

    @model_validator(mode="after")
    def _one_manipulation(self) -> UnclipRequest:
        if (self.variations is None) == (self.interpolate is None):
            raise ValueError("give variations (one picture) or interpolate (two pictures)" +
                             (", not both" if self.variations is not None else ""))
        if self.text_diff is not None and self.variations is None:
            raise ValueError("text_diff moves a picture's embedding: give the picture as variations")
        if self.text_diff is not None and not self.text_diff.strip():
            raise ValueError('text_diff needs the new caption, e.g. "a cat wearing a hat"')
        if self.amount is not None and self.text_diff is None:
            raise ValueError("amount is how far text_diff moves: give it with text_diff")
        if self.mode == "interpolate" and self.images < 2:
            raise ValueError("interpolate draws a strip from one picture to the other: give n 2 or more")
        if self.seed != "random" and self.seed + self.images - 1 > MAX_SEED:
            raise ValueError(f"seed + n - 1 must be at most {MAX_SEED}")
        if self.steps * self.images > MAX_WORK:
            raise ValueError(f"steps × n must be at most {MAX_WORK} (one request's work), got {self.steps} × "
                             f"{self.images} = {self.steps * self.images}: ask for fewer steps or fewer images")
        return self

    @property
    def mode(self) -> str:
        """carrara/unclip.py's name of the manipulation."""
        return "interpolate" if self.interpolate is not None else "text_diff" if self.text_diff else "variations"

    @property
    def images(self) -> int:
        return self.n if self.n is not None else INTERPOLATE_N if self.mode == "interpolate" else 1

    @property
    def strip_amount(self) -> float:
        """A text diff's θ at the strip's end."""
        return 0.5 if self.amount is None else self.amount

    @property
    def decoder_prompt(self) -> str:
        """The decoder's text: the prompt, except in a text diff, where the prompt is the old caption."""
        return "" if self.mode == "text_diff" else self.prompt


def error_response(status: int, message: str, field: str | None = None) -> JSONResponse:
    """A 4xx/5xx whose `message` is one line (and, for a field, FastAPI's error list in `detail`)."""
    detail = message if field is None else [{"loc": ["body", field], "msg": message, "type": "value_error"}]
    return JSONResponse({"detail": detail, "message": message}, status)
