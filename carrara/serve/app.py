"""`carrara serve`'s HTTP API (FastAPI; schema at /api/openapi.json) and the page in `static/`.

Safe by default: binds 127.0.0.1 and then answers only Host headers naming loopback (no DNS rebinding); refuses
POST/DELETE from another origin (no cross-site requests); no endpoint takes a path (image ids are uuids the server
made); request bodies are capped (413); the page loads nothing from the network (Content-Security-Policy 'self').
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from carrara import __version__
from carrara.diffusion.consistency import STUDENT_STEPS
from carrara.diffusion.settings import MAX_GUIDANCE, MAX_STEPS, SAMPLER_NAMES
from carrara.errors import CarraraError
from carrara.modelfolder import packaged
from carrara.pipeline import IMG2IMG_STRENGTH, INPAINT_STRENGTH, MAX_BATCH, Pipeline
from carrara.serve.gallery import Gallery
from carrara.serve.jobs import FINISHED, JobQueue, QueueFull
from carrara.serve.models import MAX_LOADED, Choice, ModelStore, discover, fast_name
from carrara.serve.schema import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_WORK,
    GalleryPage,
    GenerateRequest,
    JobInfo,
    error_response,
    field_range,
)
from carrara.serve.search import Searcher, search_router
from carrara.serve.unclip import RequestError, prior_job, unclip_info, unclip_router
from carrara.serve.uploads import UploadError, read_edit

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 6 * 2**20  # an init image and a mask of up to 2 MiB each, in base64 (serve/uploads.py)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'")]
EVENT_POLL_SECONDS = 0.1
# a live preview's steps for a model that is not a distilled student: 10 DPM-Solver++ steps match 20 on FD_clip
# (docs/performance.md); the preview is then the full image's composition at about half its time
DRAFT_STEPS = 10
NEUTRAL_PROMPT = "a red apple"  # the page's placeholder for a model whose folder records no sample prompts
MAX_PORT = 65535


def rss_mb() -> float:
    """This process's resident memory in MiB (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def example_prompt(model_name: str) -> str:
    """A placeholder prompt that fits the model: the first sample prompt its training recipe recorded (a run folder's
    config.json, or training/diffusion/config.json in the packaged model), else a neutral one."""
    root = packaged(model_name) or Path(model_name)
    for config in (root / "config.json", root / "training" / "diffusion" / "config.json"):
        try:
            if config.stat().st_size > 1 << 20:
                continue
            prompts = json.loads(config.read_text(encoding="utf-8")).get("sample_prompts")
        except (OSError, ValueError, AttributeError, RecursionError):
            continue
        if isinstance(prompts, list) and prompts and isinstance(prompts[0], str) and prompts[0].strip():
            return prompts[0][:MAX_PROMPT_CHARS]
    return NEUTRAL_PROMPT


def json_body_problem(body: bytes) -> str | None:
    """Why a request body is not JSON that the handlers can read (UTF-8, parseable, not nested ~1000 deep), or None."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"request body is not valid UTF-8 (at byte {e.start})"
    try:
        json.loads(text)
    except RecursionError:
        return "request body is nested too deeply"
    except json.JSONDecodeError as e:
        return f"request body is not valid JSON (at character {e.pos}: {e.msg})"
    return None


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Guard:
    """ASGI wrapper: Host check, no cross-origin POST/DELETE, body cap (413) and a body that is not UTF-8 JSON (422),
    both before any handler; security headers."""

    def __init__(self, app, *, allowed_hosts: tuple[str, ...] | None, max_body_bytes: int):
        self.app, self.allowed_hosts, self.max_body_bytes = app, allowed_hosts, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        host = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return await JSONResponse({"detail": "invalid Host header"}, 400)(scope, receive, send)
        origin = headers.get(b"origin")
        if scope["method"] not in ("GET", "HEAD") and origin is not None and \
                urlsplit(origin.decode("latin-1")).netloc != headers.get(b"host", b"").decode("latin-1"):
            return await JSONResponse({"detail": "cross-origin request refused"}, 403)(scope, receive, send)
        declared = headers.get(b"content-length", b"0")
        body, more = bytearray(), True
        if declared.isdigit() and int(declared) <= self.max_body_bytes:
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body_bytes:
                    break
        if not declared.isdigit() or int(declared) > self.max_body_bytes or len(body) > self.max_body_bytes:
            return await JSONResponse({"detail": f"request body larger than {self.max_body_bytes} bytes"}, 413)(
                scope, receive, send)
        if body and (problem := json_body_problem(bytes(body))):
            return await JSONResponse({"detail": [{"loc": ["body"], "msg": problem, "type": "json_invalid"}],
                                       "message": problem}, 422)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, replay, send_with_headers)


def _one_line(error: dict) -> str:
    """One validation error in words: "n must be between 1 and 64, got 100000", "prompt: String should ..."."""
    where = ".".join(str(p) for p in error["loc"][1:])
    if error["type"] == "json_invalid":
        return f"request body is not valid JSON (at character {where})"
    bounds = field_range(where) if error["type"] in ("greater_than_equal", "less_than_equal") else None
    if bounds is not None:
        return f"{where} must be between {bounds[0]} and {bounds[1]}, got {error.get('input')}"
    if error["type"] == "value_error" and not where:  # a check across fields ("steps × n must be at most …")
        return error["msg"].replace("Value error, ", "")
    return f"{where or 'request body'}: {error['msg']}".replace("Value error, ", "")


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with FastAPI's error list and a one-line `message` ("steps must be between 1 and 1000, got 5000")."""
    message = "; ".join(_one_line(e) for e in exc.errors())
    errors = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in exc.errors()]
    return JSONResponse({"detail": errors, "message": message}, 422)


def describe(pipe, choice: Choice, fast: str | None = None) -> dict:
    """What GET /api/model says of one loaded model: its name, hash, the sizes it makes, and the page's defaults."""
    latent = pipe.latent_shape()  # (c, h, w)
    sizes = list(getattr(pipe, "sizes", (latent[1] * pipe.vae.config.downsample_factor,)))  # a cascade has two
    defaults = {**GenerateRequest.model_construct(prompt="").model_dump(exclude={
        "prompt", "width", "height", "model", "init_image", "init_image_id", "mask", "prior_guidance", "draft"}),
        **getattr(pipe, "sampling", {})}  # a distilled student's own steps and sampler
    student = getattr(pipe, "student", None)
    # a live preview: the smallest size (no upsampler), a student's own steps, else at most DRAFT_STEPS; a model with
    # its student beside it (the choice `fast`) previews with the student
    draft = {"size": sizes[0], "steps": defaults["steps"] if student else min(defaults["steps"], DRAFT_STEPS)}
    if fast is not None:
        draft.update(model=fast, steps=STUDENT_STEPS, sampler="lcm")
    return {"name": choice.name, "ref": choice.ref, "model_hash": pipe.model_hash,
            "precision": getattr(pipe, "precision", "fp32"), "image_size": [sizes[-1], sizes[-1]], "sizes": sizes,
            "latent_shape": list(latent), "samplers": list(SAMPLER_NAMES), "defaults": defaults, "draft": draft,
            "student": student,
            "example_prompt": example_prompt(choice.path), "unclip": unclip_info(pipe)}


def create_app(pipe, data_dir: str | Path, *, max_queued: int = 32, batch_images: int = 16,
               allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS, max_body_bytes: int = MAX_BODY_BYTES,
               preview_every: int | None = None, models_dir: str | Path | None = None, max_loaded: int = MAX_LOADED,
               load=None, searcher: Searcher | None = None) -> FastAPI:
    """The app over a loaded `Pipeline` (the default model) and the models it can switch to; its worker thread
    starts and stops with the app's lifespan.

    allowed_hosts: Host header names answered (None: any, for a server bound beyond loopback).
    models_dir: a folder whose model sub-folders are offered besides the packaged ones (serve/models.py).
    load: folder → pipeline for the other models (default `Pipeline.load`).
    searcher: a loaded CLIP retrieval index for /api/search (serve/search.py); None: the page has no search box.
    """
    gallery = Gallery(data_dir)
    models = ModelStore(discover(pipe.name, models_dir), pipe, load or Pipeline.load, max_loaded=max_loaded)
    jobs = JobQueue(models, gallery, max_queued=max_queued, batch_images=batch_images, preview_every=preview_every)
    described: dict[str, dict] = {}
    started = time.time()

    async def model_info(name: str | None) -> dict:
        """describe() of a choice, loading it first if it is not in memory (CarraraError: unknown or unloadable)."""
        choice = models.choice(name)
        if choice.name not in described:
            fast = fast_name(choice.name) if fast_name(choice.name) in models.choices and not choice.fast else None
            described[choice.name] = describe(await run_in_threadpool(models.get, choice.name), choice, fast)
        return described[choice.name]

    async def requested_model(name: str | None) -> dict | JSONResponse:
        """model_info of a job's model, or the answer to give: 422 for a name not in the menu, 503 unloadable."""
        if name is not None and name not in models.choices:
            return error_response(422, f"model: no model {name!r}; choose one of {', '.join(models.choices)}", "model")
        try:
            return await model_info(name)
        except CarraraError as e:
            return error_response(503, f"model {name!r} cannot be loaded: {e}")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        jobs.start()
        yield
        jobs.stop()

    app = FastAPI(title="carrara", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json", description="Text-to-image generation with one local model.")
    app.state.jobs, app.state.gallery, app.state.models = jobs, gallery, models
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(search_router(searcher, gallery))

    def job_or_404(job_id: str) -> dict:
        snap = jobs.snapshot(job_id)
        if snap is None:
            raise HTTPException(404, f"no job {job_id}")
        return snap[0]

    def enqueue(settings, **options):
        """Queue a job: its JobInfo, or 429 when the queue is full (503 when the server is stopping)."""
        try:
            job = jobs.submit(settings, **options)
        except QueueFull as e:
            return JSONResponse({"detail": str(e)}, 429, headers={"Retry-After": str(e.retry_after)})
        except CarraraError as e:
            raise HTTPException(503, str(e)) from None
        return job_or_404(job.id)

    app.include_router(unclip_router(gallery, requested_model, enqueue))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.post("/api/generate", status_code=202, response_model=JobInfo,
              responses={413: {"description": "body too large"}, 429: {"description": "queue full; see Retry-After"}})
    async def generate(body: GenerateRequest):
        """Queue a job; poll GET /api/jobs/{id} or stream /api/jobs/{id}/events."""
        info = await requested_model(body.model)
        if isinstance(info, JSONResponse):
            return info
        sizes = info["sizes"]
        for name in ("width", "height"):
            value, other = getattr(body, name), body.height if name == "width" else body.width
            if value is not None and (value not in sizes or other not in (None, value)):  # square sizes only
                square = " or ".join(f"{s}×{s}" for s in sizes)
                return error_response(422, f"{name}: this model makes {square} images; give one of them or leave it "
                                      "out", name)
        try:
            edit = await run_in_threadpool(read_edit, body, gallery, (IMG2IMG_STRENGTH, INPAINT_STRENGTH))
            unclip = prior_job(body, info)  # an unCLIP model's prior guidance
        except (UploadError, RequestError) as e:
            return error_response(422, str(e), str(e).split(":")[0])
        return enqueue(body.settings(info["defaults"]), n=body.n, random_seed=body.seed == "random",
                       model=body.model, edit=edit, unclip=unclip, draft=body.draft)

    @app.get("/api/jobs/{job_id}", response_model=JobInfo, responses={404: {"description": "unknown job"}})
    async def job_status(job_id: str):
        """Status, progress (step of total) and, when done, the images."""
        return job_or_404(job_id)

    @app.get("/api/jobs/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}, 404: {}})
    async def job_events(job_id: str) -> StreamingResponse:
        """Server-sent events: the job as JSON on every change, with `preview` (a PNG data URL of x̂0) when new."""
        job_or_404(job_id)

        async def stream():
            yield "retry: 2000\n\n"
            version, sent_preview, last = -1, None, time.monotonic()
            jobs.watch(job_id, +1)  # previews are decoded while at least one stream watches the job
            try:
                while (snap := jobs.snapshot(job_id)) is not None:
                    data, v = snap
                    if v != version:
                        version, preview = v, data.pop("preview")
                        data["preview"] = preview if preview != sent_preview else None
                        sent_preview = preview or sent_preview
                        yield f"event: job\ndata: {json.dumps(data)}\n\n"
                        last = time.monotonic()
                        if data["status"] in FINISHED:
                            return
                    elif time.monotonic() - last > 15:
                        yield ": keep-alive\n\n"
                        last = time.monotonic()
                    await asyncio.sleep(EVENT_POLL_SECONDS)
            finally:
                jobs.watch(job_id, -1)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/jobs/{job_id}/cancel", response_model=JobInfo, responses={404: {"description": "unknown job"}})
    async def cancel(job_id: str):
        """Cancel: a queued job at once, a running one at its next step (status stays "running" until then)."""
        if jobs.cancel(job_id) is None:
            raise HTTPException(404, f"no job {job_id}")
        return job_or_404(job_id)

    @app.delete("/api/jobs/{job_id}", response_model=JobInfo, responses={404: {"description": "unknown job"}})
    async def cancel_by_delete(job_id: str):
        """The same as POST /api/jobs/{id}/cancel."""
        return await cancel(job_id)

    @app.get("/api/images/{image_id}.png", response_class=FileResponse,
             responses={200: {"content": {"image/png": {}}}, 404: {"description": "unknown image"}})
    async def image(image_id: str) -> FileResponse:
        """The PNG, with its settings in the 'carrara' text chunk (`carrara generate --from` remakes it)."""
        path = gallery.path(image_id)
        if path is None:
            raise HTTPException(404, f"no image {image_id}")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "public, max-age=31536000"})

    @app.get("/api/gallery", response_model=GalleryPage)
    async def gallery_page(offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 100):
        """Generated images, newest first; `skipped`: files start-up could not read (not listed)."""
        items, total = gallery.page(offset, limit)
        return {"items": items, "total": total, "offset": offset, "limit": limit, "skipped": gallery.skipped}

    @app.get("/api/health")
    async def health() -> dict:
        """Liveness, memory (rss_mb) and queue counts."""
        return {"status": "ok", "rss_mb": round(rss_mb(), 1), "uptime_s": round(time.time() - started, 1),
                "jobs": jobs.stats(), "gallery_skipped": gallery.skipped}

    @app.get("/api/models")
    async def model_list() -> dict:
        """The models a request may name (`model`), the default one, and which are in memory."""
        loaded = models.loaded()
        return {"default": models.default, "max_loaded": models.max_loaded,
                "models": [{"name": c.name, "ref": c.ref, "loaded": c.name in loaded} for c in models.choices.values()]}

    @app.get("/api/model", responses={404: {"description": "unknown model"}, 503: {"description": "cannot load"}})
    async def model(name: str | None = None):
        """A model (default: the one the server started with; naming another loads it): its hash, the image sizes
        it makes, the sampling defaults, and the request limits."""
        if name is not None and name not in models.choices:
            return error_response(404, f"no model {name!r}; choose one of {', '.join(models.choices)}")
        try:
            info = await model_info(name)
        except CarraraError as e:
            return error_response(503, f"model {name!r} cannot be loaded: {e}")
        return {**info, "limits": {"prompt_chars": MAX_PROMPT_CHARS, "steps": MAX_STEPS, "guidance": MAX_GUIDANCE, "n": MAX_BATCH,
                           "steps_x_n": MAX_WORK, "seed": MAX_SEED, "queue": jobs.max_queued,
                           "body_bytes": max_body_bytes}}

    app.add_middleware(_Guard, allowed_hosts=allowed_hosts, max_body_bytes=max_body_bytes)
    return app


def listen(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn (port 0: any free port), or a one-line CarraraError."""
    if not 0 <= port <= MAX_PORT:
        raise CarraraError(f"--port must be between 0 and {MAX_PORT} (0: any free port), got {port}")
    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)[0][:3]
        sock = socket.socket(family, kind, proto)  # proto TCP: asyncio then sets TCP_NODELAY (no 40 ms ACK waits)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise CarraraError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def server(app: FastAPI):
    """A uvicorn server for `app`: `.run(sockets=[listen(host, port)])`; set `.should_exit` to stop it."""
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="on"))


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a background thread (tests, notebooks); yields its base URL, stops the server on exit."""
    sock = listen(host, port)
    srv = server(app)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name="carrara-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise CarraraError(f"the server on {host}:{sock.getsockname()[1]} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(30)
        sock.close()
