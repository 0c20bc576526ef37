"""The job queue behind `carrara serve`: one worker thread, compatible jobs batched together, the models it names
loaded by a `ModelStore` (serve/models.py) on first use.

A job is one POST /api/generate: a model, a prompt, its settings and n images, image i made with seed + i as in
`carrara generate`. The worker takes the oldest queued job and adds later queued jobs with the same model, steps,
sampler, guidance, negative prompt and size whose seeds continue the batch's, so that one `Pipeline` call (image k
of a batch uses seed + k) gives every job its own seeds. An edit (img2img or inpainting) joins only edits of the
same strength, all with a mask or none: the pipeline takes one init image and one mask per image. An unCLIP
manipulation (serve/unclip.py) runs alone; text jobs on an unCLIP model join jobs of the same prior guidance.
A "random" seed is picked when the job runs, as the next free one, so random-seed jobs always join (the stochastic
samplers too: image k draws its noise from its own seed's generator). Batching changes float sums by ~1e-6, so a
batched image can differ from the same seed made alone by one level in an occasional pixel; a job that ran alone
(`batch_jobs == 1`) matches exactly.
"""
from __future__ import annotations

import base64
import io
import json
import math
import secrets
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from carrara.diffusion.settings import GenerationSettings
from carrara.errors import CarraraError
from carrara.images import image_grid, to_pil
from carrara.serve.gallery import Gallery
from carrara.serve.models import ModelStore
from carrara.serve.unclip import UnclipJob, unclip_inputs
from carrara.serve.uploads import Edit

QUEUED, RUNNING, DONE, CANCELLED, FAILED = "queued", "running", "done", "cancelled", "failed"
MAX_QUEUED_DRAFTS = 4  # live previews waiting ahead of the queue at once (each page cancels its own older one)
FINISHED = (DONE, CANCELLED, FAILED)


class QueueFull(Exception):
    """The queue holds `max_queued` jobs; try again after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class _Stop(Exception):
    """Raised inside the sampling loop to abandon a batch (all its jobs cancelled, or the server stopping)."""


@dataclass
class Job:
    """One generation request and everything a client can ask about it."""

    settings: GenerationSettings  # seed is filled in when the job starts if random_seed
    n: int = 1
    random_seed: bool = False
    model: str = ""  # the ModelStore choice it runs on
    edit: Edit | None = None  # img2img / inpainting input; None: text to image
    unclip: UnclipJob | None = None  # an unCLIP manipulation or prior guidance (serve/unclip.py)
    draft: bool = False  # a live preview: runs before queued jobs; its image is draft_image, not in the gallery
    draft_image: str | None = None  # a finished draft's PNG data URL
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = QUEUED
    step: int = 0  # the sampling step in progress (1-based); == total when done
    total: int = 0
    preview: str | None = None  # data URL of the latest decoded x̂0 (a grid when n > 1)
    preview_step: int = 0
    images: list[dict] = field(default_factory=list)  # gallery items
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    batch_jobs: int = 0  # how many jobs shared its pipeline call
    cancel_requested: bool = False
    version: int = 0  # bumped on every change; event streams watch it
    watchers: int = 0  # open event streams: x̂0 previews are decoded only while someone watches

    def batch_key(self) -> tuple:
        s = self.settings
        edit = None if self.edit is None else (self.edit.strength, self.edit.mask is not None)
        unclip = None if self.unclip is None else self.unclip.batch_key(self.id)
        return (self.model, s.steps, s.sampler, s.guidance, s.negative_prompt, s.size, edit, unclip, self.draft)

    def to_dict(self, position: int | None = None) -> dict:
        s = self.settings
        return {"id": self.id, "status": self.status, "position": position, "step": self.step, "total": self.total,
                "settings": {"prompt": s.prompt, "negative_prompt": s.negative_prompt, "steps": s.steps,
                             "sampler": s.sampler, "guidance": s.guidance,
                             "seed": None if self.random_seed and self.status == QUEUED else s.seed, "n": self.n,
                             "size": s.size, "model": self.model, **edit_settings(self.edit)},
                "images": self.images, "error": self.error, "created": self.created, "started": self.started,
                "finished": self.finished, "batch_jobs": self.batch_jobs, "events_url": f"/api/jobs/{self.id}/events",
                "unclip": None if self.unclip is None else self.unclip.describe(), "draft": self.draft,
                "draft_image": self.draft_image}


def edit_settings(edit: Edit | None) -> dict:
    """How a job's settings (and its images' metadata) describe an edit."""
    if edit is None:
        return {"edit": None, "strength": None, "init_image": None}
    return {"edit": "img2img" if edit.mask is None else "inpaint", "strength": edit.strength, "init_image": edit.source}


def log_line(job: Job) -> str:
    """The server's one line about a finished job: id, status, seconds (running, or queued if it never ran), n,
    steps, the prompt (JSON-quoted, so a newline in it cannot break the line) and the error if any."""
    seconds = job.finished - (job.started or job.created)
    prompt = job.settings.prompt
    quoted = json.dumps(prompt[:80] + ("…" if len(prompt) > 80 else ""), ensure_ascii=False)
    error = f" — {job.error.splitlines()[0]}" if job.error else ""
    kind = "draft " if job.draft else ""
    return (f"carrara serve: {kind}job {job.id} {job.status} in {seconds:.1f} s: n={job.n} steps={job.settings.steps} "
            f"prompt={quoted}{error}")


def _data_url(images) -> str:
    """PIL images → one PNG data URL (a grid when there are several)."""
    buf = io.BytesIO()
    (images[0] if len(images) == 1 else image_grid(images)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class JobQueue:
    """A bounded FIFO of jobs and the one thread that runs them on the models of `models`, saving results to
    `gallery`."""

    def __init__(self, models: ModelStore, gallery: Gallery, *, max_queued: int = 32, batch_images: int = 16,
                 keep_finished: int = 1000, preview_every: int | None = None):
        self.models, self.gallery = models, gallery
        self.max_queued, self.batch_images, self.keep_finished = max_queued, batch_images, keep_finished
        self.preview_every = preview_every  # steps between x̂0 previews; None: about 10 per job
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._paused = self._closed = False
        self._batch_seconds: float | None = None  # moving average of one pipeline call
        self.counts = {DONE: 0, CANCELLED: 0, FAILED: 0, "images": 0, "batches": 0}
        self._thread = threading.Thread(target=self._run, name="carrara-serve-worker", daemon=True)

    # --- what the HTTP handlers call ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what is queued, abandon the running batch at its next step, and join the worker."""
        with self._cond:
            self._closed = True
            while self._queue:
                self._finish(self._queue.popleft(), CANCELLED, error="the server stopped")
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def pause(self) -> None:
        """Hold queued jobs (the running batch finishes); for tests and maintenance."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def model_ref(self) -> str:
        """What PNG metadata records for the model the server started with."""
        return self.models.choice(None).ref

    def submit(self, settings: GenerationSettings, n: int = 1, random_seed: bool = False,
               model: str | None = None, edit: Edit | None = None, unclip: UnclipJob | None = None,
               draft: bool = False) -> Job:
        """Queue a job on a model (None: the one the server started with), editing `edit`'s picture if given, with
        an unCLIP model's inputs if given, or raise QueueFull. A draft goes ahead of every queued job but older
        drafts: a live preview must not wait for a batch of 64 (the client cancels the draft it supersedes)."""
        job = Job(settings, n=n, random_seed=random_seed, model=self.models.choice(model).name, edit=edit,
                  unclip=unclip, total=settings.steps, draft=draft)
        with self._cond:
            if self._closed:
                raise CarraraError("the server is stopping")
            if len(self._queue) >= self.max_queued:
                raise QueueFull(self.retry_after())
            drafts = sum(q.draft for q in self._queue)  # queued drafts are at the front
            if draft and drafts >= MAX_QUEUED_DRAFTS:  # many pages typing at once must not starve the queue
                raise QueueFull(self.retry_after())
            if draft:
                self._queue.insert(drafts, job)
            else:
                self._queue.append(job)
            self._jobs[job.id] = job
            self._evict()
            self._cond.notify_all()
        return job

    def snapshot(self, job_id: str) -> tuple[dict, int] | None:
        """(the job as JSON, its version) read under the lock, or None for an unknown id."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            position = next((k + 1 for k, q in enumerate(self._queue) if q is job), None)
            return {**job.to_dict(position), "preview": job.preview, "preview_step": job.preview_step}, job.version

    def watch(self, job_id: str, delta: int) -> None:
        """An event stream opened (+1) or closed (−1) on a job."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is not None:
                job.watchers = max(0, job.watchers + delta)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once, a running one at its next step; finished jobs stay as they are."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is not None and job.status == QUEUED:
                self._queue.remove(job)
                self._finish(job, CANCELLED)
            elif job is not None and job.status == RUNNING:
                job.cancel_requested = True
                job.version += 1
            return job

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: a slot frees when the running batch ends."""
        return max(1, min(60, math.ceil(self._batch_seconds or 1.0)))

    def stats(self) -> dict:
        with self._cond:
            running = sum(job.status == RUNNING for job in self._jobs.values())
            return {"queued": len(self._queue), "running": running, "max_queued": self.max_queued,
                    "paused": self._paused, **self.counts}

    # --- the worker ---------------------------------------------------------------------------------------------

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        """Set a final status and log the job's one line (call with the lock held)."""
        job.status, job.error, job.finished, job.preview = status, error, time.time(), None
        if status == DONE:
            job.step = job.total
        job.version += 1
        self.counts[status] += 1
        print(log_line(job), file=sys.stderr, flush=True)

    def _evict(self) -> None:
        """Forget the oldest finished jobs beyond `keep_finished` (call with the lock held)."""
        finished = [job_id for job_id, job in self._jobs.items() if job.status in FINISHED]
        for job_id in finished[:max(0, len(finished) - self.keep_finished)]:
            del self._jobs[job_id]

    def _next_batch(self) -> list[Job]:
        """Take the oldest job and the queued jobs that can share its pipeline call (call with the lock held)."""
        first = self._queue.popleft()
        if first.random_seed:
            first.settings.seed = secrets.randbelow(2**32)
        batch, images = [first], first.n
        next_seed = first.settings.seed + first.n
        for job in list(self._queue):
            if images + job.n > self.batch_images or job.batch_key() != first.batch_key():
                continue
            if not job.random_seed and job.settings.seed != next_seed:
                continue
            job.settings.seed = next_seed
            self._queue.remove(job)
            batch.append(job)
            images, next_seed = images + job.n, next_seed + job.n
        for job in batch:
            job.status, job.started, job.batch_jobs = RUNNING, time.time(), len(batch)
            job.version += 1
        return batch

    def _metadata(self, job: Job, i: int, pipe, size: int) -> dict:
        """PNG metadata of image i of a job: `carrara generate`'s keys, so `carrara generate --from` remakes it."""
        s = job.settings
        return {"prompt": s.prompt, "negative_prompt": s.negative_prompt, "steps": s.steps, "sampler": s.sampler,
                "guidance": s.guidance, "seed": s.seed + i, "n": 1, "model": self.models.choice(job.model).ref,
                "model_name": job.model, **self._edit_metadata(job.edit),
                **({"fast": True, "student": pipe.student} if self.models.choice(job.model).fast else {}),
                **({"lora": pipe.loras} if getattr(pipe, "loras", None) else {}),  # adapters merged at start (--lora)
                "model_hash": pipe.model_hash, "precision": getattr(pipe, "precision", "fp32"), "size": size}

    @staticmethod
    def _edit_metadata(edit: Edit | None) -> dict:
        """An edit's strength and what it started from (the SHA-256 of the picture and mask files)."""
        if edit is None:
            return {}
        return {**{k: v for k, v in edit_settings(edit).items() if k != "edit"}, "init_sha256": edit.image_sha256,
                **({"mask_sha256": edit.mask_sha256} if edit.mask is not None else {})}

    @staticmethod
    def _edit_inputs(batch: list[Job]) -> dict:
        """The pipeline's init_image / mask (one per image) and strength for a batch of edits; {} for text to image."""
        edit = batch[0].edit
        if edit is None:
            return {}
        inputs = {"init_image": [job.edit.image for job in batch for _ in range(job.n)], "strength": edit.strength}
        if edit.mask is not None:
            inputs["mask"] = [job.edit.mask for job in batch for _ in range(job.n)]
        return inputs

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._paused or not self._queue):
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._next_batch()
            self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        """One pipeline call for the whole batch; progress and x̂0 previews go to every job in it."""
        s = batch[0].settings
        every = self.preview_every or max(1, s.steps // 10)
        offsets = [sum(job.n for job in batch[:k]) for k in range(len(batch) + 1)]

        def callback(i: int, n_steps: int, decode) -> None:
            if self._closed or all(job.cancel_requested for job in batch):
                raise _Stop
            previews = None
            # a preview costs a decode of the whole batch and a PNG per job: only when a stream is open on it
            if i % every == 0 and not batch[0].draft and any(job.watchers for job in batch):  # a draft: no x̂0
                x = to_pil(decode())  # (B, 3, H, W) → B images
                previews = [_data_url(x[offsets[k]:offsets[k + 1]]) for k in range(len(batch))]
            with self._cond:
                for k, job in enumerate(batch):
                    job.step, job.total = i + 1, n_steps
                    if previews is not None:
                        job.preview, job.preview_step = previews[k], i + 1
                    job.version += 1

        start = time.perf_counter()
        try:
            pipe = self.models.get(batch[0].model)  # loaded on first use; the least recently used may be dropped
            unclip, per_image = unclip_inputs(pipe, batch[0].unclip, offsets[-1], s.seed)  # one key: one unclip
            images = pipe([job.settings.prompt for job in batch for _ in range(job.n)], steps=s.steps,
                               sampler=s.sampler, guidance=s.guidance, negative_prompt=s.negative_prompt,
                               seed=s.seed, callback=callback, **({"size": s.size} if s.size is not None else {}),
                               **self._edit_inputs(batch), **unclip)
        except _Stop:
            with self._cond:
                for job in batch:
                    self._finish(job, CANCELLED, None if job.cancel_requested else "the server stopped")
            return
        except Exception as e:  # noqa: BLE001 (a failed job must not stop the worker)
            message = str(e) if isinstance(e, CarraraError) else f"{type(e).__name__}: {e}"
            with self._cond:
                for job in batch:
                    self._finish(job, FAILED, message.splitlines()[0] if message else type(e).__name__)
            return
        seconds = time.perf_counter() - start
        self._batch_seconds = seconds if self._batch_seconds is None else 0.8 * self._batch_seconds + 0.2 * seconds
        for k, job in enumerate(batch):
            status, error, items = (CANCELLED if job.cancel_requested else DONE), None, []
            try:
                if status == DONE and job.draft:
                    job.draft_image = _data_url(images[offsets[k]:offsets[k + 1]])
                elif status == DONE:
                    items = self.gallery.add_all(images[offsets[k]:offsets[k + 1]],
                                                 [{**self._metadata(job, i, pipe, images[0].width),
                                                   **per_image[offsets[k] + i]} for i in range(job.n)],
                                                 job_id=job.id)
            except (OSError, CarraraError) as e:
                status, error = FAILED, f"cannot save the images, none was kept: {e}"
            with self._cond:
                job.images = items
                self._finish(job, status, error)
                self.counts["images"] += len(items)
        with self._cond:
            self.counts["batches"] += 1
            self._evict()
