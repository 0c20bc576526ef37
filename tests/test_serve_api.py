"""`carrara serve`'s HTTP API on the tiny trained model: validation, limits, queue, cancel, batching, pixels."""
import io
import json
import math
import re
import socket
import struct
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import carrara.serve.gallery as gallery_module
from carrara.cli import main
from carrara.pipeline import Pipeline
from carrara.png import read_png_metadata, save_png
from carrara.serve.app import NEUTRAL_PROMPT, create_app, example_prompt, running
from carrara.serve.gallery import Gallery

STEPS = 4
GATE_TIMEOUT = 60  # seconds a gated step waits for the test before the job fails (a failed test, not a slow machine)


class SteppedPipe:
    """The tiny pipeline taking each sampling step only when the test allows it: progress a test can watch step by
    step however loaded the machine is, with no sleeps. Counts the x̂0 decodes the server asks for."""

    def __init__(self, pipe: Pipeline):
        self._pipe, self._cond = pipe, threading.Condition()
        self.limit = 0  # steps of the current pipeline call the worker may take; back to 0 when a call ends
        self.decodes = 0

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def allow(self, steps: float = 1) -> None:
        """Let the worker take `steps` more steps (math.inf: run freely from now on)."""
        with self._cond:
            self.limit += steps
            self._cond.notify_all()

    def allow_through(self, step: int) -> None:
        """Let the worker take the steps of the current call up to `step` (1-based)."""
        with self._cond:
            self.limit = max(self.limit, step)
            self._cond.notify_all()

    def __call__(self, prompts, *, callback=None, **kwargs):
        def gated(i, n, decode):
            with self._cond:
                if not self._cond.wait_for(lambda: i < self.limit, timeout=GATE_TIMEOUT):
                    raise RuntimeError(f"the test never allowed step {i + 1}")

            def counted():
                self.decodes += 1
                return decode()

            callback(i, n, counted)

        try:
            return self._pipe(prompts, callback=gated, **kwargs)
        finally:
            with self._cond:
                self.limit = math.inf if self.limit == math.inf else 0


@pytest.fixture(scope="module")
def pipe(tiny_diffusion_run):
    return Pipeline.load(tiny_diffusion_run)


def client_for(pipe, data_dir, **options) -> TestClient:
    """A TestClient (use it in `with`: that starts the worker) speaking to the app as http://127.0.0.1."""
    return TestClient(create_app(pipe, data_dir, **options), base_url="http://127.0.0.1")


def wait(client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/api/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']}"
        time.sleep(0.05)
    return job


def follow(client, job: dict, stepped: SteppedPipe) -> list[dict]:
    """The job's server-sent events, letting the worker take the next step only once the stream has shown the last."""
    events = []
    with client.stream("GET", job["events_url"]) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if events[-1]["status"] in ("queued", "running"):
                    stepped.allow_through(events[-1]["step"] + 1)
    return events


def wait_for_step(client, job_id: str, step: int, timeout: float = 60) -> None:
    """Poll the job until it shows `step` (a state change, with a deadline)."""
    deadline = time.monotonic() + timeout
    while client.get(f"/api/jobs/{job_id}").json()["step"] < step:
        assert time.monotonic() < deadline, f"job {job_id} never reached step {step}"
        time.sleep(0.02)


@pytest.fixture
def stepped(pipe):
    stepped = SteppedPipe(pipe)
    yield stepped
    stepped.allow(math.inf)  # a failed test must not leave the worker waiting


def pixels(png: bytes | str) -> np.ndarray:
    with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture
def client(pipe, tmp_path):
    with client_for(pipe, tmp_path / "data") as c:
        yield c


BAD = [({}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": "   "}, "prompt"), ({"prompt": "x" * 1001}, "prompt"),
       ({"negative_prompt": "x" * 1001}, "negative_prompt"), ({"steps": 0}, "steps"), ({"steps": 1001}, "steps"),
       ({"steps": "5"}, "steps"), ({"guidance": -1}, "guidance"), ({"guidance": 50.5}, "guidance"), ({"n": 0}, "n"),
       ({"n": 65}, "n"), ({"sampler": "heun"}, "sampler"), ({"seed": -1}, "seed"), ({"seed": "lucky"}, "seed"),
       ({"seed": 2**53}, "seed"), ({"width": 32}, "width"), ({"height": 8}, "height"), ({"width": 0}, "width"),
       ({"path": "/etc/passwd"}, "path")]


@pytest.mark.parametrize("body, field", [({"prompt": "a", **b} if "prompt" not in b and b else b, f) for b, f in BAD])
def test_invalid_settings_are_422_with_a_message(client, body, field):
    r = client.post("/api/generate", json=body)
    assert r.status_code == 422, r.text
    assert field in r.json()["message"] and "\n" not in r.json()["message"]


def test_model_size_is_accepted_and_non_json_is_rejected(client):
    assert client.post("/api/generate", json={"prompt": "a", "width": 16, "height": 16, "steps": 1}).status_code == 202
    assert client.post("/api/generate", content="prompt=a", headers={"Content-Type": "text/plain"}).status_code == 422


def test_body_size_limit_is_413(client):
    r = client.post("/api/generate", content=json.dumps({"prompt": "a" * (6 * 2**20 + 1)}),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_foreign_host_header_is_refused(client):
    assert client.get("/api/health", headers={"Host": "attacker.example"}).status_code == 400
    assert client.get("/api/health", headers={"Host": "localhost:7860"}).status_code == 200
    assert client.get("/api/health", headers={"Host": "[::1]:7860"}).status_code == 200


def test_cross_origin_posts_are_refused(client):
    evil = {"Origin": "http://attacker.example"}
    assert client.post("/api/generate", content='{"prompt": "a"}', headers=evil).status_code == 403
    assert client.post("/api/jobs/0123/cancel", headers=evil).status_code == 403
    same = {"Origin": "http://127.0.0.1"}
    assert client.post("/api/generate", json={"prompt": "a", "steps": 1}, headers=same).status_code == 202


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/jobs/0123"), ("GET", "/api/jobs/0123/events"), ("POST", "/api/jobs/0123/cancel"),
    ("DELETE", "/api/jobs/0123"), ("GET", "/api/images/" + "0" * 32 + ".png"), ("GET", "/api/images/..%2Fx.png"),
    ("GET", "/api/images/../../etc/passwd.png"),
])
def test_unknown_ids_are_404(client, method, path):
    assert client.request(method, path).status_code == 404


def test_full_queue_is_429_with_retry_after_and_cancel_frees_a_slot(pipe, tmp_path):
    with client_for(pipe, tmp_path, max_queued=2) as c:
        jobs = c.app.state.jobs
        jobs.pause()
        ids = [c.post("/api/generate", json={"prompt": f"a red circle {i}", "steps": STEPS}).json()["id"]
               for i in range(2)]
        assert [c.get(f"/api/jobs/{i}").json()["position"] for i in ids] == [1, 2]
        full = c.post("/api/generate", json={"prompt": "one too many"})
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
        cancelled = c.post(f"/api/jobs/{ids[0]}/cancel").json()
        assert cancelled["status"] == "cancelled" and cancelled["images"] == []
        assert c.delete(f"/api/jobs/{ids[0]}").json()["status"] == "cancelled"  # cancelling twice is harmless
        third = c.post("/api/generate", json={"prompt": "now it fits", "steps": STEPS})
        assert third.status_code == 202
        jobs.resume()
        assert [wait(c, i)["status"] for i in (ids[1], third.json()["id"])] == ["done", "done"]
        assert c.get("/api/gallery").json()["total"] == 2


def test_cancel_a_running_job(stepped, tmp_path):
    with client_for(stepped, tmp_path) as c:
        job = c.post("/api/generate", json={"prompt": "a blue square", "steps": 400}).json()
        stepped.allow(2)
        wait_for_step(c, job["id"], 2)
        c.delete(f"/api/jobs/{job['id']}")
        stepped.allow(1)  # the next step sees the cancel
        done = wait(c, job["id"])
        assert done["status"] == "cancelled" and done["step"] == 2 and done["images"] == []
        assert c.get("/api/gallery").json()["total"] == 0
        stepped.allow(math.inf)
        after = c.post("/api/generate", json={"prompt": "still works", "steps": 2}).json()  # the worker lives on
        assert wait(c, after["id"])["status"] == "done"


def test_api_image_has_the_cli_pixels_and_metadata(client, pipe, tiny_diffusion_run, tmp_path):
    settings = {"prompt": "a small red circle", "negative_prompt": "blue", "steps": STEPS, "sampler": "ddim",
                "guidance": 3.0, "seed": 7}
    job = wait(client, client.post("/api/generate", json=settings).json()["id"])
    assert job["status"] == "done" and job["batch_jobs"] == 1 and job["step"] == job["total"] == STEPS
    png = client.get(job["images"][0]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    (tmp_path / "api.png").write_bytes(png.content)
    meta = read_png_metadata(tmp_path / "api.png")
    assert {k: meta[k] for k in settings} == settings and meta["n"] == 1 and meta["model_hash"] == pipe.model_hash
    assert main(["generate", settings["prompt"], "--model", str(tiny_diffusion_run), "--steps", str(STEPS),
                 "--sampler", "ddim", "--guidance", "3", "--negative", "blue", "--seed", "7",
                 "-o", str(tmp_path / "cli.png")]) == 0
    assert main(["generate", "--from", str(tmp_path / "api.png"), "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(pixels(png.content), pixels(tmp_path / "cli.png"))
    assert np.array_equal(pixels(png.content), pixels(tmp_path / "again.png"))
    assert job["images"][0]["settings"] == {**settings, "n": 1, "size": 16,  # the size made, as `generate` records
                                            "model": client.app.state.models.default, "edit": None,
                                            "strength": None, "init_image": None}


def test_compatible_jobs_share_a_batch_and_keep_their_seeds(pipe, tmp_path):
    """A (seeds 100, 101), B (102) and C (random → 103, 104) share one call; D (seed 5) and E (DDPM) run alone."""
    with client_for(pipe, tmp_path) as c:
        c.app.state.jobs.pause()
        base = {"steps": STEPS, "sampler": "dpmpp", "guidance": 4.0}
        bodies = [{**base, "prompt": "a red circle", "seed": 100, "n": 2},
                  {**base, "prompt": "a blue square", "seed": 102},
                  {**base, "prompt": "a green triangle", "seed": "random", "n": 2},
                  {**base, "prompt": "x", "seed": 5},
                  {**base, "prompt": "a red circle", "seed": 103, "sampler": "ddpm"}]
        ids = [c.post("/api/generate", json=b).json()["id"] for b in bodies]
        assert c.get(f"/api/jobs/{ids[2]}").json()["settings"]["seed"] is None  # random: picked when it runs
        c.app.state.jobs.resume()
        jobs = [wait(c, i) for i in ids]
        assert [j["status"] for j in jobs] == ["done"] * 5
        assert [j["batch_jobs"] for j in jobs] == [3, 3, 3, 1, 1]
        assert [j["settings"]["seed"] for j in jobs] == [100, 102, 103, 5, 103]
        got = [pixels(c.get(item["url"]).content) for j in jobs for item in j["images"]]
    kw = {"steps": STEPS, "guidance": 4.0}
    prompts = ["a red circle"] * 2 + ["a blue square"] + ["a green triangle"] * 2
    expected = (pipe(prompts, seed=100, sampler="dpmpp", **kw) + pipe(["x"], seed=5, sampler="dpmpp", **kw)
                + pipe(["a red circle"], seed=103, sampler="ddpm", **kw))
    assert len(got) == len(expected) == 7
    for g, e in zip(got, expected):
        assert np.array_equal(g, np.asarray(e))
    for g, prompt, seed in zip(got[:5], prompts, range(100, 105)):  # alone: the same image up to the batch's rounding
        alone = np.asarray(pipe([prompt], seed=seed, sampler="dpmpp", **kw)[0]).astype(int)
        assert np.abs(g.astype(int) - alone).max() <= 1


def test_concurrent_clients_all_get_their_images(pipe, tmp_path):
    app = create_app(pipe, tmp_path)
    with running(app) as url:
        def client_job(k: int) -> tuple[dict, np.ndarray]:
            with httpx.Client(base_url=url, timeout=60) as http:
                body = {"prompt": ["a red circle", "a blue square"][k % 2], "steps": STEPS, "seed": 1000 + k,
                        "sampler": ["dpmpp", "ddim"][k // 4 % 2]}
                job = http.post("/api/generate", json=body)
                assert job.status_code == 202, job.text
                job = wait(http, job.json()["id"])
                return job, pixels(http.get(job["images"][0]["url"]).content)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(client_job, range(8)))
    for job, image in results:
        s = job["settings"]
        assert job["status"] == "done" and len(job["images"]) == 1
        alone = np.asarray(pipe([s["prompt"]], steps=STEPS, sampler=s["sampler"], seed=s["seed"])[0]).astype(int)
        diff = np.abs(image.astype(int) - alone).max()
        assert diff == 0 if job["batch_jobs"] == 1 else diff <= 1
    assert app.state.jobs.counts["done"] == 8


def test_events_stream_progress_previews_and_the_result(stepped, tmp_path):
    # Each step waits until the stream has shown the one before (`follow`), so every step is seen on any load.
    with client_for(stepped, tmp_path, preview_every=2) as c:
        job = c.post("/api/generate", json={"prompt": "a red circle", "steps": 6, "n": 2}).json()
        events = follow(c, job, stepped)
    steps = [e["step"] for e in events if e["status"] == "running"]
    assert [step for step in steps if step] in ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6])  # 6 only if seen before "done"
    previews = [(e["step"], e["preview"]) for e in events if e["preview"]]
    assert [step for step, _ in previews] == [1, 3, 5]  # x̂0 of steps i = 0, 2, 4 (preview_every=2)
    assert all(p.startswith("data:image/png;base64,") for _, p in previews)
    assert events[-1]["status"] == "done" and len(events[-1]["images"]) == 2


def test_previews_are_decoded_only_while_a_stream_watches(stepped, tmp_path):
    with client_for(stepped, tmp_path, preview_every=1) as c:
        polled = c.post("/api/generate", json={"prompt": "a red circle", "steps": 4}).json()
        stepped.allow(4)
        assert wait(c, polled["id"])["status"] == "done"
        assert stepped.decodes == 0  # polling GET /api/jobs/{id} shows no preview: none is made
        watched = c.post("/api/generate", json={"prompt": "a red circle", "steps": 4}).json()
        events = follow(c, watched, stepped)
    # steps 1-3 are each shown before the next is allowed; the last one's event may be overtaken by "done"
    assert events[-1]["status"] == "done" and sum(bool(e["preview"]) for e in events) in (3, 4)
    assert stepped.decodes == 4  # one per step while watched


def test_gallery_is_kept_on_disk_newest_first(pipe, tmp_path):
    with client_for(pipe, tmp_path) as c:
        for prompt in ("first", "second"):
            wait(c, c.post("/api/generate", json={"prompt": prompt, "steps": 2, "n": 2}).json()["id"])
    (tmp_path / "images" / "broken.json").write_text("{not json")
    assert not list((tmp_path / "images").glob(".*.tmp")) and len(list((tmp_path / "images").glob("*.png"))) == 4
    with client_for(pipe, tmp_path) as c:  # a restarted server
        page = c.get("/api/gallery").json()
        assert page["total"] == 4 and [i["settings"]["prompt"] for i in page["items"]] == ["second"] * 2 + ["first"] * 2
        assert [i["settings"]["seed"] for i in page["items"]][:2] == [1, 0]  # image i of a job has seed + i
        assert c.get("/api/gallery?offset=3&limit=2").json()["items"][0]["settings"]["prompt"] == "first"
        assert c.get(page["items"][0]["url"]).status_code == 200
        assert c.get("/api/health").json()["gallery_skipped"] == 1


def test_health_model_openapi_and_page(client):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["rss_mb"] > 10 and health["jobs"]["queued"] == 0
    model = client.get("/api/model").json()
    assert model["image_size"] == [16, 16] and model["limits"]["n"] == 64 and model["defaults"]["steps"] == 20
    paths = client.get("/api/openapi.json").json()["paths"]
    assert {"/api/generate", "/api/jobs/{job_id}", "/api/jobs/{job_id}/events", "/api/jobs/{job_id}/cancel",
            "/api/images/{image_id}.png", "/api/gallery", "/api/health", "/api/model"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text  # nothing from a CDN


def test_serve_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope"), "--port", "0", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["serve", "--model", str(tmp_path / "nope"), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "warning: serving on 0.0.0.0" in err and err.count("\n") == 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--port", str(busy.getsockname()[1]), "--data-dir", str(tmp_path)]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_worker_survives_a_failing_pipeline(pipe, tmp_path):
    class Broken(SteppedPipe):
        def __call__(self, prompts, **kwargs):
            raise RuntimeError("out of memory\nsecond line")

    with client_for(Broken(pipe), tmp_path) as c:
        job = wait(c, c.post("/api/generate", json={"prompt": "a"}).json()["id"])
        assert job["status"] == "failed" and job["error"] == "RuntimeError: out of memory"
        assert c.app.state.jobs._thread.is_alive()


def metadata(seed: int = 0, prompt: str = "a red circle") -> dict:
    """PNG metadata as the server writes it, for galleries built without running the pipeline."""
    return {"prompt": prompt, "negative_prompt": "", "steps": 2, "sampler": "dpmpp", "guidance": 4.0, "seed": seed,
            "n": 1, "model": "tiny", "model_hash": "0123456789ab", "precision": "fp32"}


def red(size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), (200, 30, 30))


GOOD_SIDECAR = {"id": "", "url": "", "created": 1.0, "job_id": "j", "settings": {**metadata(), "n": 1}, "model": "tiny",
                "model_hash": "0123456789ab", "size": [16, 16]}
BAD_SIDECARS = {
    "created missing": json.dumps({k: v for k, v in GOOD_SIDECAR.items() if k != "created"}).encode(),
    "created a string": json.dumps({**GOOD_SIDECAR, "created": "yesterday"}).encode(),
    "created NaN": json.dumps({**GOOD_SIDECAR, "created": float("nan")}).encode(),
    "settings not an object": json.dumps({**GOOD_SIDECAR, "settings": "x"}).encode(),
    "settings.steps a string": json.dumps({**GOOD_SIDECAR, "settings": {**GOOD_SIDECAR["settings"], "steps": "2"}}
                                          ).encode(),
    "not JSON": b"{not json",
    "a JSON list": b"[]",
    "not UTF-8": b'{"id": "\xff"}',
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("content", BAD_SIDECARS.values(), ids=BAD_SIDECARS.keys())
def test_an_unreadable_sidecar_is_skipped_and_counted(pipe, tmp_path, content):
    """Issue 15 §3.1: one bad sidecar stopped the server (KeyError: 'created') or made every gallery page a 500."""
    good, bad = Gallery(tmp_path).add_all([red(), red()], [metadata(0), metadata(1)], job_id="j")
    sidecar = tmp_path / "images" / f"{bad['id']}.json"
    sidecar.write_bytes(content.replace(b'"id": ""', f'"id": "{bad["id"]}"'.encode()))
    with client_for(pipe, tmp_path) as c:
        page = c.get("/api/gallery")
        assert page.status_code == 200
        assert [i["id"] for i in page.json()["items"]] == [good["id"]] and page.json()["skipped"] == 1
        assert c.get(f"/api/images/{bad['id']}.png").status_code == 404  # an unlisted image is not served
        assert c.get("/api/health").json()["gallery_skipped"] == 1


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width × height pixels and holds none: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_startup_tidies_what_a_kill_left(pipe, tmp_path):
    """Issue 15 §3.9: SIGKILL between a PNG and its sidecar left an orphan PNG (served, not listed) and a .tmp file."""
    kept, orphan = Gallery(tmp_path).add_all([red(), red()], [metadata(0), metadata(1, "a blue square")], job_id="j")
    images = tmp_path / "images"
    (images / f"{orphan['id']}.json").unlink()  # killed after the PNG, before its sidecar
    (images / f".{uuid.uuid4().hex}.json.k2j4h1.tmp").write_text('{"id": ')  # killed inside a write
    bare, bomb = uuid.uuid4().hex, uuid.uuid4().hex
    red().save(images / f"{bare}.png")  # a PNG without carrara metadata
    (images / f"{bomb}.png").write_bytes(png_header(20_000, 20_000))
    with client_for(pipe, tmp_path) as c:
        items = {i["id"]: i for i in c.get("/api/gallery").json()["items"]}
        assert set(items) == {kept["id"], orphan["id"]}
        adopted = items[orphan["id"]]
        assert {k: v for k, v in adopted.items() if k not in ("created", "job_id")} == \
            {k: v for k, v in orphan.items() if k not in ("created", "job_id")}
        assert c.get(adopted["url"]).status_code == 200
        assert [c.get(f"/api/images/{i}.png").status_code for i in (bare, bomb)] == [404, 404]
        assert c.app.state.gallery.summary() == (
            f"gallery {images}: 2 images listed; unreadable sidecars skipped: 0; PNGs without a sidecar: 1 adopted, "
            "2 removed (1 no carrara metadata, 1 too large); leftover temporary files removed: 1")
    assert sorted(p.name for p in images.iterdir()) == sorted(f"{i}.{ext}" for i in items for ext in ("png", "json"))
    with client_for(pipe, tmp_path) as c:  # the adopted image stays adopted
        assert c.get("/api/gallery").json()["total"] == 2 and c.app.state.gallery.adopted == 0


def test_a_job_saves_its_images_all_or_none(pipe, tmp_path, monkeypatch):
    """Issue 15 §3.14: a job that saved one of two images reported `failed` while that one was in the gallery."""
    written = []

    def second_save_fails(path, image, meta):
        written.append(path)
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        save_png(path, image, meta)

    monkeypatch.setattr(gallery_module, "save_png", second_save_fails)
    with client_for(pipe, tmp_path) as c:
        job = wait(c, c.post("/api/generate", json={"prompt": "a red circle", "steps": 2, "n": 2}).json()["id"])
        assert job["status"] == "failed" and job["images"] == []
        assert job["error"] == "cannot save the images, none was kept: [Errno 28] No space left on device"
        assert c.get("/api/gallery").json()["total"] == 0
        assert c.get(f"/api/images/{written[0].stem}.png").status_code == 404
    assert len(written) == 2 and list((tmp_path / "images").iterdir()) == []


HOSTILE = {
    "invalid UTF-8": (b'\xff{"prompt": "a"}', "request body is not valid UTF-8 (at byte 0)"),
    "invalid UTF-8 in a string": (b'{"prompt": "a\xff"}', "request body is not valid UTF-8 (at byte 13)"),
    "nested 30000 deep": (b"[" * 30_000 + b"]" * 30_000, "request body is nested too deeply"),
    "malformed JSON": (b'{"prompt": "a", "n": }', "request body is not valid JSON (at character 21: Expecting value)"),
    "n too big": (b'{"prompt": "a", "n": 100000}', "n must be between 1 and 64, got 100000"),
    "steps too big": (b'{"prompt": "a", "steps": 5000}', "steps must be between 1 and 1000, got 5000"),
    "too much work": (b'{"prompt": "a", "steps": 1000, "n": 64}', ("steps × n must be at most 1280 (one request's "
                      "work), got 1000 × 64 = 64000: ask for fewer steps or fewer images")),
}


@pytest.mark.parametrize("body, message", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_bodies_are_422_with_a_clear_message(client, body, message):
    """Issue 15 §3.15 and §3.16: 400 without a message, "21: JSON decode error", "give between 1 and 64 prompts"."""
    r = client.post("/api/generate", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["message"] == message


def test_the_largest_allowed_work_is_accepted(client):
    client.app.state.jobs.pause()
    assert client.get("/api/model").json()["limits"]["steps_x_n"] == 1280
    for body in ({"steps": 20, "n": 64}, {"steps": 1000, "n": 1}):
        r = client.post("/api/generate", json={"prompt": "a", **body})
        assert r.status_code == 202 and client.delete(f"/api/jobs/{r.json()['id']}").json()["status"] == "cancelled"
    assert client.post("/api/generate", json={"prompt": "a", "steps": 21, "n": 64}).status_code == 422


def test_the_server_logs_one_line_per_job(pipe, tmp_path, capsys):
    with client_for(pipe, tmp_path) as c:
        c.app.state.jobs.pause()
        waiting = c.post("/api/generate", json={"prompt": "x", "steps": 3}).json()["id"]
        c.delete(f"/api/jobs/{waiting}")
        c.app.state.jobs.resume()
        done = wait(c, c.post("/api/generate", json={"prompt": "a red\ncircle", "steps": 2, "n": 2}).json()["id"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("carrara serve: job")]
    assert len(lines) == 2
    assert re.fullmatch(rf"carrara serve: job {waiting} cancelled in \d+\.\d s: n=1 steps=3 prompt=\"x\"", lines[0])
    assert re.fullmatch(rf'carrara serve: job {done["id"]} done in \d+\.\d s: n=2 steps=2 prompt="a red\\ncircle"',
                        lines[1])


def test_the_page_suggests_a_prompt_the_model_knows(client, tmp_path):
    assert client.get("/api/model").json()["example_prompt"] == "a red circle"  # the tiny run's first sample prompt
    assert example_prompt("default") == "a flag"  # recorded in the packaged model's training/diffusion/config.json
    assert example_prompt(str(tmp_path)) == NEUTRAL_PROMPT


@pytest.mark.parametrize("port", ["99999", "65536", "-1"])
def test_a_port_out_of_range_is_one_line(tmp_path, capsys, port):
    """Issue 15 §3.11: `carrara serve --port 99999` ended in an OverflowError traceback."""
    assert main(["serve", "--port", port, "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"carrara: error: --port must be between 0 and 65535 (0: any free port), got {port}\n"


def test_an_unbindable_address_is_one_line(tmp_path, capsys):
    assert main(["serve", "--host", "192.0.2.1", "--port", "0", "--data-dir", str(tmp_path)]) == 2  # TEST-NET-1
    warning, error = capsys.readouterr().err.splitlines()
    assert warning.startswith("carrara: warning: serving on 192.0.2.1")
    assert error == "carrara: error: cannot listen on 192.0.2.1:0: Cannot assign requested address"
