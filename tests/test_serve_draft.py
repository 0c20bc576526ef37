"""`carrara serve`'s live preview: draft jobs (one image, ahead of the queue, not kept) and the model's own defaults."""
import json

import pytest

from carrara.pipeline import Pipeline
from tests.test_serve_api import client_for, pixels, wait


@pytest.fixture(scope="module")
def pipe(tiny_diffusion_run):
    return Pipeline.load(tiny_diffusion_run)


@pytest.fixture(scope="module")
def distilled_student(tiny_diffusion_run, tiny_shapes, tmp_path_factory):
    """A 2-step consistency distillation of the tiny run: a student folder (guidance embedded)."""
    from carrara.train.distill import train_distill
    from tests.test_distill import _recipe

    out = tmp_path_factory.mktemp("student")
    train_distill(_recipe(tiny_diffusion_run, tiny_shapes, steps=2), out, progress=False)
    return out


def test_a_draft_is_the_same_image_returned_in_the_job_and_not_kept(pipe, tmp_path):
    import base64

    body = {"prompt": "a red circle", "steps": 4, "seed": 3}
    with client_for(pipe, tmp_path / "data") as client:
        draft = wait(client, client.post("/api/generate", json={**body, "draft": True}).json()["id"])
        assert draft["status"] == "done" and draft["draft"] is True and draft["images"] == []
        assert client.get("/api/gallery").json()["total"] == 0  # nothing written
        assert not list((tmp_path / "data").rglob("*.png"))
        full = wait(client, client.post("/api/generate", json=body).json()["id"])
        assert full["draft"] is False and full["draft_image"] is None
        kept = client.get(full["images"][0]["url"]).content
    assert draft["draft_image"].startswith("data:image/png;base64,")
    png = base64.b64decode(draft["draft_image"].split(",", 1)[1])
    assert (pixels(png) == pixels(kept)).all()  # a draft is the image those settings make, just not kept


def test_a_draft_is_one_image(pipe, tmp_path):
    with client_for(pipe, tmp_path / "data") as client:
        r = client.post("/api/generate", json={"prompt": "a red circle", "draft": True, "n": 2})
    assert r.status_code == 422 and "a draft is one image (n = 1), got n = 2" in r.json()["message"]


def test_drafts_run_before_queued_jobs_in_their_own_order(pipe, tmp_path):
    with client_for(pipe, tmp_path / "data") as client:
        client.app.state.jobs.pause()
        ids = [client.post("/api/generate", json={"prompt": p, "steps": 2, **extra}).json()["id"]
               for p, extra in [("first", {}), ("draft one", {"draft": True}), ("second", {}),
                                ("draft two", {"draft": True})]]
        positions = {client.get(f"/api/jobs/{i}").json()["settings"]["prompt"]: client.get(f"/api/jobs/{i}").json()["position"]
                     for i in ids}
        assert positions == {"draft one": 1, "draft two": 2, "first": 3, "second": 4}
        client.delete(f"/api/jobs/{ids[1]}")  # a superseded draft, cancelled by the page
        assert client.get(f"/api/jobs/{ids[3]}").json()["position"] == 1
        client.app.state.jobs.resume()
        done = [wait(client, i) for i in ids]
    assert [j["status"] for j in done] == ["done", "cancelled", "done", "done"]
    assert done[3]["started"] < done[0]["started"]


def test_the_page_is_told_how_to_preview(pipe, tmp_path):
    with client_for(pipe, tmp_path / "data") as client:
        model = client.get("/api/model").json()
    assert model["student"] is None
    assert model["defaults"]["steps"] == 20 and model["defaults"]["sampler"] == "dpmpp"
    assert model["draft"] == {"size": model["sizes"][0], "steps": 10}


def test_a_student_is_served_at_its_own_steps_and_sampler(distilled_student, tmp_path):
    """A request that names no steps or sampler gets the model's own: a distilled student's 4 `lcm` steps (as
    `carrara generate` does), and the page's defaults and drafts say so."""
    student = Pipeline.load(distilled_student)
    with client_for(student, tmp_path / "data") as client:
        model = client.get("/api/model").json()
        job = wait(client, client.post("/api/generate", json={"prompt": "a red circle"}).json()["id"])
        named = wait(client, client.post("/api/generate", json={"prompt": "a red circle", "steps": 2,
                                                                  "sampler": "ddim"}).json()["id"])
    assert model["student"] is not None
    assert (model["defaults"]["steps"], model["defaults"]["sampler"]) == (4, "lcm")
    assert model["draft"]["steps"] == 4
    assert job["status"] == "done" and (job["settings"]["steps"], job["settings"]["sampler"]) == (4, "lcm")
    assert (named["settings"]["steps"], named["settings"]["sampler"]) == (2, "ddim")


def test_at_most_four_drafts_wait_ahead_of_the_queue(pipe, tmp_path):
    """Each page cancels its own older draft; many pages typing at once get a 429 for a fifth waiting draft, so
    queued jobs are not starved."""
    from carrara.serve.jobs import MAX_QUEUED_DRAFTS

    with client_for(pipe, tmp_path / "data") as client:
        client.app.state.jobs.pause()
        codes = [client.post("/api/generate", json={"prompt": f"p{i}", "steps": 2, "draft": True}).status_code
                 for i in range(MAX_QUEUED_DRAFTS + 1)]
        job = client.post("/api/generate", json={"prompt": "a full job", "steps": 2})
        client.app.state.jobs.resume()
    assert MAX_QUEUED_DRAFTS == 4 and codes == [202] * 4 + [429] and job.status_code == 202


def test_a_draft_makes_no_denoising_previews(pipe, tmp_path):
    """A draft is a few steps: the x̂0 previews of a full job (a decode and a PNG per step) would cost more than
    they show, and the page does not show them."""
    with client_for(pipe, tmp_path / "data", preview_every=1) as client:
        job = client.post("/api/generate", json={"prompt": "a red circle", "steps": 3, "draft": True}).json()
        with client.stream("GET", job["events_url"]) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert events[-1]["status"] == "done" and not any(e.get("preview") for e in events)
