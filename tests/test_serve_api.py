"""`carrara serve`'s HTTP API on the tiny trained model: validation, limits, queue, cancel, batching, pixels."""
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from carrara.cli import main
from carrara.pipeline import Pipeline
from carrara.png import read_png_metadata
from carrara.serve.app import create_app, running

STEPS = 4


class SlowPipe:
    """The tiny pipeline, `delay` seconds slower per step: jobs long enough to watch and cancel, at no CPU cost."""

    def __init__(self, pipe: Pipeline, delay: float):
        self._pipe, self.delay = pipe, delay

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, prompts, *, callback=None, **kwargs):
        def slow(i, n, decode):
            time.sleep(self.delay)
            if callback is not None:
                callback(i, n, decode)

        return self._pipe(prompts, callback=slow, **kwargs)


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
       ({"n": 65}, "n"), ({"sampler": "euler"}, "sampler"), ({"seed": -1}, "seed"), ({"seed": "lucky"}, "seed"),
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
    r = client.post("/api/generate", content=json.dumps({"prompt": "a" * 70_000}),
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


def test_cancel_a_running_job(pipe, tmp_path):
    with client_for(SlowPipe(pipe, 0.05), tmp_path) as c:
        job = c.post("/api/generate", json={"prompt": "a blue square", "steps": 400}).json()
        deadline = time.monotonic() + 60
        while c.get(f"/api/jobs/{job['id']}").json()["step"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        c.delete(f"/api/jobs/{job['id']}")
        done = wait(c, job["id"], timeout=10)
        assert done["status"] == "cancelled" and 2 <= done["step"] < 400 and done["images"] == []
        assert c.get("/api/gallery").json()["total"] == 0
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
    assert job["images"][0]["settings"] == {**settings, "n": 1}


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


def test_events_stream_progress_previews_and_the_result(pipe, tmp_path):
    # The stream polls the job every EVENT_POLL_SECONDS (0.1 s) and sends the latest state, so steps must last
    # longer than that for each one to be seen: 0.3 s per step, 6 steps.
    with client_for(SlowPipe(pipe, 0.3), tmp_path, preview_every=2) as c:
        job = c.post("/api/generate", json={"prompt": "a red circle", "steps": 6, "n": 2}).json()
        with c.stream("GET", job["events_url"]) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    steps = [e["step"] for e in events if e["status"] == "running"]
    assert steps == sorted(steps) and len(set(steps)) >= 3
    previews = [e["preview"] for e in events if e["preview"]]
    assert len(previews) >= 2 and all(p.startswith("data:image/png;base64,") for p in previews)
    assert events[-1]["status"] == "done" and len(events[-1]["images"]) == 2


class CountingPipe(SlowPipe):
    """Counts the x̂0 decodes the server asks for (each one decodes the whole batch)."""

    def __init__(self, pipe: Pipeline, delay: float):
        super().__init__(pipe, delay)
        self.decodes = 0

    def __call__(self, prompts, *, callback=None, **kwargs):
        def counting(i, n, decode):
            def counted():
                self.decodes += 1
                return decode()
            if callback is not None:
                callback(i, n, counted)

        return super().__call__(prompts, callback=counting, **kwargs)


def test_previews_are_decoded_only_while_a_stream_watches(pipe, tmp_path):
    counting = CountingPipe(pipe, 0.3)
    with client_for(counting, tmp_path, preview_every=1) as c:
        polled = c.post("/api/generate", json={"prompt": "a red circle", "steps": 4}).json()
        assert wait(c, polled["id"])["status"] == "done"
        assert counting.decodes == 0  # polling GET /api/jobs/{id} shows no preview: none is made
        watched = c.post("/api/generate", json={"prompt": "a red circle", "steps": 4}).json()
        with c.stream("GET", watched["events_url"]) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert events[-1]["status"] == "done" and any(e["preview"] for e in events)
    assert 1 <= counting.decodes <= 4


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
    class Broken(SlowPipe):
        def __call__(self, prompts, **kwargs):
            raise RuntimeError("out of memory\nsecond line")

    with client_for(Broken(pipe, 0), tmp_path) as c:
        job = wait(c, c.post("/api/generate", json={"prompt": "a"}).json()["id"])
        assert job["status"] == "failed" and job["error"] == "RuntimeError: out of memory"
        assert c.app.state.jobs._thread.is_alive()
