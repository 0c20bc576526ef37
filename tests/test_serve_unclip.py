"""unCLIP through `carrara serve`: POST /api/unclip's variations, interpolation strips and text diffs are the pixels
and PNG records `carrara generate --variations/--interpolate/--text-diff` makes for the same seed, from an upload or a
gallery image; a strip's ends are each picture's first variation; /api/generate's prior_guidance is the CLI's
--prior-guidance; a model that is not unCLIP, a bad picture or a bad combination is a 422 with one line."""
import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import test_unclip
from PIL import Image
from test_serve_api import client_for, wait
from test_serve_api import metadata as served_metadata
from test_serve_browser import CHROMIUM, launch
from test_unclip import gen

from carrara.fileio import file_sha256
from carrara.pipeline import Pipeline
from carrara.png import read_png_metadata
from carrara.serve.app import create_app, running
from carrara.serve.gallery import Gallery

STEPS = 4
# tests/test_unclip.py's tiny unCLIP fixtures: a 40-step decoder on two solid colours, and it joined to a prior
colours, pixel_model, decoder_run, unclip_model = (test_unclip.colours, test_unclip.pixel_model,
                                                   test_unclip.decoder_run, test_unclip.unclip_model)


@pytest.fixture(scope="module")
def pipe(decoder_run):
    return Pipeline.load(decoder_run[0], precision="fp32")


@pytest.fixture
def client(pipe, tmp_path):
    with client_for(pipe, tmp_path / "data") as c:
        yield c


def data_url(path) -> str:
    """The file's own bytes as a data URL: its SHA-256 is the file's, as the CLI records it."""
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def pixels(data: bytes | str) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return np.asarray(im.convert("RGB"))


def run(client, body: dict) -> dict:
    r = client.post("/api/unclip", json={"steps": STEPS, "seed": 3, **body})
    assert r.status_code == 202, r.text
    job = wait(client, r.json()["id"])
    assert job["status"] == "done", job
    return job


def images(client, job: dict) -> list[np.ndarray]:
    return [pixels(client.get(item["url"]).content) for item in job["images"]]


def metadata(client, item: dict, tmp_path) -> dict:
    path = tmp_path / f"{item['id']}.png"
    path.write_bytes(client.get(item["url"]).content)
    return read_png_metadata(path)


def test_variations_are_the_clis_pixels_and_records(client, decoder_run, colours, tmp_path):
    model, red = decoder_run[0], colours / "red.png"
    job = run(client, {"variations": data_url(red), "n": 2})
    assert job["batch_jobs"] == 1 and job["unclip"]["mode"] == "variations"
    assert gen(model, "--variations", str(red), "--n", "2", "--seed", "3", "-o", str(tmp_path / "v.png")) == 0
    got = images(client, job)
    assert np.array_equal(got[0], pixels(tmp_path / "v-0.png")) and np.array_equal(got[1], pixels(tmp_path / "v-1.png"))
    assert not np.array_equal(got[0], got[1])  # new noise for each
    meta, cli = metadata(client, job["images"][1], tmp_path), read_png_metadata(tmp_path / "v-1.png")
    assert meta["unclip"] == {"mode": "variations", "images": [{"source": "upload", "sha256": file_sha256(red)[:16]}]}
    assert meta["unclip"]["images"][0]["sha256"] == cli["unclip"]["images"][0]["sha256"]
    assert (meta["seed"], cli["seed"]) == (4, 4) and "theta" not in meta and "prior" not in meta
    item = job["images"][0]
    assert item["unclip"] == {**meta["unclip"], "theta": 0.0} and item["settings"]["prompt"] == ""

    # a gallery image is a picture too: its variations are those of its own PNG's bytes
    again = run(client, {"variations": item["id"]})
    (tmp_path / "made.png").write_bytes(client.get(item["url"]).content)
    assert gen(model, "--variations", str(tmp_path / "made.png"), "--seed", "3", "-o", str(tmp_path / "g.png")) == 0
    assert np.array_equal(images(client, again)[0], pixels(tmp_path / "g.png"))
    assert again["unclip"]["images"] == [{"source": f"gallery:{item['id']}",
                                          "sha256": file_sha256(tmp_path / "made.png")[:16]}]


def test_a_strips_ends_are_each_pictures_first_variation(client, decoder_run, colours, tmp_path):
    red, blue = data_url(colours / "red.png"), data_url(colours / "blue.png")
    v_red, v_blue = (images(client, run(client, {"variations": p}))[0] for p in (red, blue))
    strip = run(client, {"interpolate": [red, blue], "n": 3})
    got = images(client, strip)
    assert np.array_equal(got[0], v_red) and np.array_equal(got[2], v_blue)  # slerp's ends, one noise
    assert not np.array_equal(got[1], got[0]) and not np.array_equal(got[1], got[2])
    metas = [metadata(client, item, tmp_path) for item in strip["images"]]
    assert [m["theta"] for m in metas] == [0.0, 0.5, 1.0] and [m["seed"] for m in metas] == [3, 3, 3]
    assert [r["sha256"] for r in metas[1]["unclip"]["images"]] == [
        file_sha256(colours / f)[:16] for f in ("red.png", "blue.png")]
    assert gen(decoder_run[0], "--interpolate", str(colours / "red.png"), str(colours / "blue.png"), "--n", "3",
               "--seed", "3", "-o", str(tmp_path / "i.png")) == 0
    assert all(np.array_equal(g, pixels(tmp_path / f"i-{k}.png")) for k, g in enumerate(got))  # the CLI's strip

    diff = run(client, {"variations": red, "text_diff": "a blue square", "amount": 0.6, "n": 2,
                        "prompt": "a square"})
    moved = images(client, diff)
    assert np.array_equal(moved[0], v_red) and not np.array_equal(moved[1], v_red)  # θ = 0 is the picture's own z_i
    meta = metadata(client, diff["images"][1], tmp_path)
    assert meta["unclip"]["new_caption"] == "a blue square" and meta["unclip"]["old_caption"] == "a square"
    assert meta["unclip"]["amount"] == 0.6 and meta["theta"] == 0.6 and meta["prompt"] == ""
    assert gen(decoder_run[0], "a square", "--variations", str(colours / "red.png"), "--text-diff", "a blue square",
               "--amount", "0.6", "--n", "2", "--seed", "3", "-o", str(tmp_path / "t.png")) == 0
    assert np.array_equal(moved[1], pixels(tmp_path / "t-1.png"))


def test_manipulations_never_share_a_pipeline_call(client, colours):
    client.app.state.jobs.pause()
    red = data_url(colours / "red.png")
    ids = [client.post("/api/unclip", json={"variations": red, "steps": 2, "seed": s}).json()["id"] for s in (0, 1)]
    client.app.state.jobs.resume()
    assert [wait(client, i)["batch_jobs"] for i in ids] == [1, 1]


def test_the_model_says_it_is_unclip_and_the_prior_guidance_is_the_clis(unclip_model, tiny_diffusion_run, tmp_path):
    model, _ = unclip_model
    pipe = Pipeline.load(model, precision="fp32")
    with client_for(pipe, tmp_path / "data") as c:
        info = c.get("/api/model").json()["unclip"]
        assert info["prior"] is True and info["prior_settings"] == pipe.unclip.prior_settings
        r = c.post("/api/generate", json={"prompt": "a red circle", "steps": STEPS, "seed": 2, "prior_guidance": 3.0})
        job = wait(c, r.json()["id"])
        assert job["status"] == "done" and job["unclip"] == {"prior_guidance": 3.0}
        got = pixels(c.get(job["images"][0]["url"]).content)
        meta = metadata(c, job["images"][0], tmp_path)
    assert gen(model, "a red circle", "--prior-guidance", "3", "--seed", "2", "-o", str(tmp_path / "p.png")) == 0
    assert np.array_equal(got, pixels(tmp_path / "p.png"))
    assert meta["prior"] == read_png_metadata(tmp_path / "p.png")["prior"] and meta["prior"]["guidance"] == 3.0
    plain = Pipeline.load(tiny_diffusion_run, precision="fp32")
    with client_for(plain, tmp_path / "other") as c:
        assert c.get("/api/model").json()["unclip"] is None
        r = c.post("/api/generate", json={"prompt": "a", "steps": 1, "prior_guidance": 2.0})
        assert r.status_code == 422 and r.json()["message"].startswith("prior_guidance: steers an unCLIP model's prior")
        r = c.post("/api/unclip", json={"variations": "0" * 32})
        assert r.status_code == 422 and "is not an unCLIP model" in r.json()["message"]
        assert "\n" not in r.json()["message"]


def gif_url(colours) -> str:
    buf = io.BytesIO()
    Image.open(colours / "red.png").save(buf, format="GIF")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def bad_requests(colours) -> dict:
    red = data_url(colours / "red.png")
    return {
        "nothing": ({}, "give variations (one picture) or interpolate (two pictures)"),
        "both": ({"variations": red, "interpolate": [red, red]}, "not both"),
        "one picture to interpolate": ({"interpolate": [red]}, "interpolate"),
        "a strip of one": ({"interpolate": [red, red], "n": 1}, "give n 2 or more"),
        "text_diff alone": ({"interpolate": [red, red], "text_diff": "a cat"}, "give the picture as variations"),
        "blank caption": ({"variations": red, "text_diff": "  "}, "text_diff needs the new caption"),
        "amount alone": ({"variations": red, "amount": 0.3}, "give it with text_diff"),
        "amount 2": ({"variations": red, "text_diff": "a cat", "amount": 2}, "amount must be between 0.0 and 1.0, got 2"),
        "a path": ({"variations": "/etc/passwd"}, "variations: not a gallery image id or a PNG or JPEG data URL"),
        "unknown id": ({"variations": "0" * 32}, f"variations: no image {'0' * 32} in the gallery"),
        "a GIF": ({"interpolate": [red, gif_url(colours)]}, "interpolate.1: a GIF image; send a PNG or JPEG"),
        "not an image": ({"variations": "data:image/png;base64," + base64.b64encode(b"hello").decode()},
                         "variations: not a PNG or JPEG image"),
        "prior guidance": ({"variations": red, "prior_guidance": 2}, "prior_guidance"),
        "too much work": ({"variations": red, "steps": 1000, "n": 2}, "steps × n must be at most"),
    }


def test_bad_requests_are_422_with_one_line(client, colours):
    for name, (body, message) in bad_requests(colours).items():
        r = client.post("/api/unclip", json={"steps": 1, **body})
        assert r.status_code == 422, (name, r.text)
        assert message in r.json()["message"] and "\n" not in r.json()["message"], (name, r.json()["message"])
    r = client.post("/api/generate", json={"prompt": "a red circle", "steps": 1})  # a decoder alone has no prior
    assert r.status_code == 422 and "has no prior" in r.json()["message"]
    assert client.get("/api/health").json()["jobs"]["queued"] == 0


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_the_page_makes_variations_strips_and_text_diffs(pipe, colours, tmp_path):
    """With an unCLIP model the page shows its section and the gallery's "variations" and "pick": Enter on a
    picture's "variations" makes the images the pipeline makes from its z_i; an upload as A and a picked picture as
    B make a strip from A to B; a caption and the amount slider make a text diff of A."""
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    made, = Gallery(tmp_path / "data").add_all([Image.open(colours / "red.png").convert("RGB")],
                                               [served_metadata(3)], job_id="j")
    app = create_app(pipe, tmp_path / "data")
    with running(app) as url, sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            expect(page.locator("#unclip")).to_be_visible()
            expect(page.get_by_label("Prior guidance")).to_be_hidden()  # a decoder alone: no prior
            page.fill("#steps", str(STEPS))
            page.uncheck("#random")
            page.fill("#seed", "3")
            page.fill("#n", "2")
            card = page.locator(f"#image-{made['id']}")
            card.locator("button.variations").focus()
            page.keyboard.press("Enter")
            expect(page.locator("#gallery .card")).to_have_count(3, timeout=60_000)
            expect(page.locator("#slot-a")).to_have_attribute("alt", "picture A: “a red circle” (seed 3)")

            page.set_input_files("#file-a", str(colours / "blue.png"))
            expect(page.locator("#slot-a")).to_have_attribute("alt", "picture A: blue.png")
            card.locator("button.pick").click()
            expect(page.locator("#slot-b")).to_have_attribute("alt", "picture B: “a red circle” (seed 3)")
            page.fill("#strip-n", "3")
            page.get_by_role("button", name="interpolate A → B").click()
            expect(page.locator("#gallery .card")).to_have_count(6, timeout=60_000)

            page.get_by_label("Text diff: new caption").fill("a red square")
            page.get_by_role("slider", name="Amount").focus()
            for _ in range(2):
                page.keyboard.press("ArrowRight")  # 0.5 → 0.6 in steps of 0.05
            expect(page.locator("#amount-value")).to_have_text("0.60")
            page.get_by_role("button", name="text diff of A").click()
            expect(page.locator("#gallery .card")).to_have_count(9, timeout=60_000)
            expect(page.locator("#gallery .card .muted").first).to_contain_text("text diff → “a red square” θ 0.6")
            shot = tmp_path / "serve_unclip.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            assert not errors, errors
        finally:
            browser.close()
        items = httpx.get(url + "/api/gallery").json()["items"][::-1][1:]  # oldest first, without the picture
        got = [pixels(httpx.get(url + item["url"]).content) for item in items]
        source = pixels(httpx.get(url + made["url"]).content)
    assert [i["unclip"]["mode"] for i in items] == ["variations"] * 2 + ["interpolate"] * 3 + ["text_diff"] * 3
    assert items[0]["unclip"]["images"] == [{"source": f"gallery:{made['id']}",
                                             "sha256": file_sha256(Gallery(tmp_path / "data").path(made["id"]))[:16]}]
    z = pipe.unclip.embed_pictures([Image.fromarray(source), Image.open(colours / "blue.png")])  # (2, E)
    expected = pipe(["", ""], image_embeds=z[:1].expand(2, -1), steps=STEPS, seed=3)
    assert all(np.array_equal(g, np.asarray(e)) for g, e in zip(got[:2], expected))  # the pipeline's variations
    ends = pipe(["", ""], image_embeds=z[[1, 0]], steps=STEPS, seed=3, same_noise=True)
    assert np.array_equal(got[2], np.asarray(ends[0])) and np.array_equal(got[4], np.asarray(ends[1]))
    assert [i["unclip"]["theta"] for i in items[5:]] == [0.0, 0.3, 0.6]
    assert items[5]["unclip"]["new_caption"] == "a red square" and np.array_equal(got[5], got[2])  # θ = 0: A itself
