"""The page in headless Chromium (Debian's, driven by Playwright): prompt → live denoising → a gallery that survives
a reload, with working "copy settings", "download PNG" and "reuse settings"; the model menu switches models; with an
index, the search box and "nearest training images" show thumbnails."""
import base64
import io
import json
import math
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from test_cli_generate import write_tiny_model
from test_serve_api import SteppedPipe, metadata, pixels

from carrara.evaluate.retrieval import ClipIndex
from carrara.models.clip import ClipScorer
from carrara.pipeline import Pipeline
from carrara.png import read_png_metadata
from carrara.serve.app import create_app, running
from carrara.serve.gallery import Gallery
from carrara.serve.search import Searcher

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed: `make setup` "
                                "installs it as root, else run `sudo apt-get install chromium`")

RECORD = """() => {  // every text the step counters show, and whether a preview image arrived
  window.seen = [];
  window.previews = 0;
  new MutationObserver((changes) => {
    for (const c of document.querySelectorAll("#jobs .step-counter")) window.seen.push(c.textContent);
    window.previews += changes.filter((m) => m.attributeName === "src").length;
  }).observe(document.getElementById("jobs"),
             {subtree: true, childList: true, characterData: true, attributes: true, attributeFilter: ["src"]});
}"""


def test_generate_watch_it_denoise_and_keep_the_gallery(tiny_diffusion_run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    pipe = SteppedPipe(Pipeline.load(tiny_diffusion_run))  # the test lets each step happen: the counter is seen move
    app = create_app(pipe, tmp_path / "data", preview_every=1)
    with running(app) as url, sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 800},
                                          permissions=["clipboard-read", "clipboard-write"])
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            expect(page.locator("#model")).to_contain_text(pipe.model_hash)
            expect(page.locator("#prompt")).to_have_attribute("placeholder", "a red circle")  # the model's own prompt
            page.fill("#prompt", "a red circle")
            page.fill("#steps", "8")
            page.fill("#n", "2")
            page.evaluate(RECORD)
            page.click("#generate")
            for step in (1, 2, 3):
                pipe.allow(1)
                expect(page.locator("#jobs .step-counter")).to_have_text(f"step {step} / 8", timeout=60_000)
            pipe.allow(math.inf)
            expect(page.locator("#gallery .card")).to_have_count(2, timeout=60_000)
            steps = [s for s in page.evaluate("window.seen") if s.startswith("step ")]
            assert len(set(steps)) >= 3, steps  # e.g. "step 1 / 8", "step 2 / 8", …
            assert page.evaluate("window.previews") >= 2
            expect(page.locator("#jobs .step-counter")).to_have_count(0, timeout=10_000)  # the panel goes when done

            page.reload()
            expect(page.locator("#gallery .card")).to_have_count(2)
            expect(page.locator("#gallery .card .prompt").first).to_have_text("a red circle")
            expect(page.locator("#count")).to_have_text("(2)")
            assert page.locator("#search").is_hidden() and page.locator("button.nearest").count() == 0  # no index
            assert page.locator("#unclip").is_hidden() and page.locator("button.variations").first.is_hidden()
            assert page.get_by_label("Prior guidance").is_hidden()  # not an unCLIP model: no unCLIP controls
            page.wait_for_function("() => [...document.querySelectorAll('#gallery img')]"
                                   ".every((img) => img.naturalWidth === 16)")
            shot = tmp_path / "serve_page.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")

            newest = page.locator("#gallery .card").first
            newest.locator("button.copy").click()
            copied = json.loads(page.evaluate("navigator.clipboard.readText()"))
            assert copied["prompt"] == "a red circle" and copied["steps"] == 8 and copied["n"] == 1
            page.fill("#prompt", "something else")
            page.fill("#steps", "3")
            newest.locator("button.reuse").click()
            expect(page.locator("#seed")).to_have_value(str(copied["seed"]))
            assert not page.is_checked("#random") and page.input_value("#prompt") == "a red circle"
            assert page.input_value("#steps") == "8" and page.input_value("#n") == "1"
            href = newest.locator("a.download").get_attribute("href")
            (tmp_path / "download.png").write_bytes(httpx.get(url + href).content)
            assert read_png_metadata(tmp_path / "download.png")["seed"] == copied["seed"]
            assert not errors, errors
        finally:
            pipe.allow(math.inf)
            browser.close()


def launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])


def test_the_model_menu_switches_and_reuse_brings_back_every_setting(tiny_diffusion_run, tmp_path):
    """Make an image with the second model, go back to the first with other settings, and "reuse settings": the
    form shows the second model and all the image's settings, and Generate remakes the same pixels."""
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    write_tiny_model(tmp_path / "models" / "other")
    pipe = Pipeline.load(tiny_diffusion_run)
    other = Pipeline.load(tmp_path / "models" / "other")
    app = create_app(pipe, tmp_path / "data", models_dir=tmp_path / "models")
    with running(app) as url, sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            expect(page.locator("#model")).to_contain_text(pipe.model_hash)
            assert "other" in page.locator("#model-choice option").all_text_contents()
            page.select_option("#model-choice", "other")
            expect(page.locator("#model")).to_contain_text(other.model_hash)
            expect(page.locator("#prompt")).to_have_attribute("placeholder", "a red apple")  # no sample prompts
            settings = {"#prompt": "a blue square", "#negative_prompt": "red", "#steps": "3", "#guidance": "2.5"}
            for selector, value in settings.items():
                page.fill(selector, value)
            page.select_option("#sampler", "euler")
            page.uncheck("#random")
            page.fill("#seed", "42")
            page.click("#generate")
            expect(page.locator("#gallery .card")).to_have_count(1, timeout=60_000)

            page.select_option("#model-choice", tiny_diffusion_run.name)
            expect(page.locator("#model")).to_contain_text(pipe.model_hash)
            page.fill("#prompt", "something else")
            page.fill("#seed", "7")
            page.fill("#n", "3")
            assert page.input_value("#sampler") == "dpmpp" and page.input_value("#steps") == "20"  # the defaults
            page.locator("#gallery .card button.reuse").click()
            expect(page.locator("#model")).to_contain_text(other.model_hash)
            assert page.input_value("#model-choice") == "other"
            for selector, value in {**settings, "#seed": "42", "#n": "1", "#size": "16"}.items():
                assert page.input_value(selector) == value, selector
            assert page.input_value("#sampler") == "euler" and not page.is_checked("#random")
            page.click("#generate")
            expect(page.locator("#gallery .card")).to_have_count(2, timeout=60_000)
            urls = [img.get_attribute("src") for img in page.locator("#gallery .card img").all()]
            assert not errors, errors
        finally:
            browser.close()
        images = [httpx.get(url + u).content for u in urls]
    assert np.array_equal(pixels(images[0]), pixels(images[1]))  # reused settings, same pixels
    (tmp_path / "made.png").write_bytes(images[0])
    meta = read_png_metadata(tmp_path / "made.png")
    assert {k: meta[k] for k in ("prompt", "negative_prompt", "steps", "sampler", "guidance", "seed", "model_hash")} \
        == {"prompt": "a blue square", "negative_prompt": "red", "steps": 3, "sampler": "euler", "guidance": 2.5,
            "seed": 42, "model_hash": other.model_hash}


def decoded(data_url: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))) as im:
        return np.asarray(im.convert("L"))


def newest_item(url: str) -> dict:
    return httpx.get(url + "/api/gallery?limit=1").json()["items"][0]


def brush(page, points: list[tuple[float, float]]) -> None:
    """One stroke of the mouse over the mask canvas, through fractions of its side."""
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()  # in the viewport's coordinates, as the mouse moves
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for x, y in xy[1:]:
        page.mouse.move(x, y, steps=4)
    page.mouse.up()


def test_the_page_does_img2img_and_inpainting(tiny_diffusion_run, tmp_path):
    """Upload a picture, set the strength, Generate: img2img. "Use this image" on a gallery card, paint with the brush
    (undo and clear work), Generate: inpainting, whose unpainted pixels are the picture's own. Each result is the
    `Pipeline` call with the picture and the mask the page sent."""
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    pipe = Pipeline.load(tiny_diffusion_run)
    left_red = np.zeros((16, 16, 3), np.uint8)
    left_red[:, :8], left_red[:, 8:] = (220, 30, 30), (30, 30, 220)
    Image.fromarray(left_red).save(tmp_path / "upload.png")
    app = create_app(pipe, tmp_path / "data")
    with running(app) as url, sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            expect(page.locator("#model")).to_contain_text(pipe.model_hash)
            page.fill("#prompt", "a red circle")
            page.fill("#steps", "4")
            page.click("#generate")
            expect(page.locator("#gallery .card")).to_have_count(1, timeout=60_000)
            first = newest_item(url)

            # img2img: a file, strength 0.5
            page.set_input_files("#init-file", str(tmp_path / "upload.png"))
            expect(page.locator("#canvas-stack")).to_be_visible()
            expect(page.locator("#edit-mode")).to_have_text("(img2img)")
            page.locator("#strength").evaluate("(s) => { s.value = 0.5; s.dispatchEvent(new Event('input')); }")
            expect(page.locator("#strength-value")).to_have_text("0.50")
            page.fill("#prompt", "a blue square")
            page.uncheck("#random")
            page.fill("#seed", "5")
            page.click("#generate")
            expect(page.locator("#gallery .card")).to_have_count(2, timeout=60_000)
            img2img = newest_item(url)

            # inpainting: "use this image" on the first card, then the brush
            page.locator(f"#image-{first['id']} button.use").click()
            expect(page.locator("#edit-mode")).to_have_text("(img2img)")
            brush(page, [(0.1, 0.1), (0.2, 0.2)])
            brush(page, [(0.7, 0.2), (0.75, 0.5), (0.8, 0.8)])
            expect(page.locator("#edit-mode")).to_have_text("(inpainting)")
            two = int((decoded(page.evaluate("maskDataURL()")) >= 128).sum())
            page.click("#mask-undo")
            one = decoded(page.evaluate("maskDataURL()"))
            assert 0 < int((one >= 128).sum()) < two and one[1:4, 1:4].min() == 255 and one[:, 8:].max() == 0
            page.click("#mask-clear")
            assert decoded(page.evaluate("maskDataURL()")).max() == 0
            expect(page.locator("#edit-mode")).to_have_text("(img2img)")
            brush(page, [(0.6, 0.1), (0.7, 0.5), (0.8, 0.9)])
            mask = decoded(page.evaluate("maskDataURL()"))
            assert 0 < int((mask >= 128).sum()) < mask.size // 2
            assert page.input_value("#strength") == "1"  # inpainting's default, the slider untouched since
            page.fill("#prompt", "a green triangle")
            page.fill("#seed", "9")
            page.click("#generate")
            expect(page.locator("#gallery .card")).to_have_count(3, timeout=60_000)
            inpainted = newest_item(url)
            shot = tmp_path / "serve_edit.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            assert not errors, errors
        finally:
            browser.close()
        got = {item["id"]: pixels(httpx.get(url + item["url"]).content) for item in (first, img2img, inpainted)}
    assert (img2img["settings"]["edit"], img2img["settings"]["strength"], img2img["settings"]["init_image"]) == (
        "img2img", 0.5, "upload")
    expected = pipe(["a blue square"], steps=4, seed=5, init_image=Image.fromarray(left_red), strength=0.5)[0]
    assert np.array_equal(got[img2img["id"]], np.asarray(expected))
    s = inpainted["settings"]
    assert (s["edit"], s["strength"], s["init_image"]) == ("inpaint", 1.0, f"gallery:{first['id']}")
    init = Image.fromarray(got[first["id"]])
    expected = pipe(["a green triangle"], steps=4, seed=9, init_image=init, mask=Image.fromarray(mask, "L"))[0]
    assert np.array_equal(got[inpainted["id"]], np.asarray(expected))
    keep = mask < 128
    assert np.array_equal(got[inpainted["id"]][keep], got[first["id"]][keep])  # unpainted: the picture's own pixels
    assert not np.array_equal(got[inpainted["id"]][~keep], got[first["id"]][~keep])


def test_the_search_box_shows_the_nearest_training_images(tiny_diffusion_run, tiny_shapes, tiny_clip_run, tmp_path):
    """With an index: type words and press Enter, and a row of thumbnails shows the API's answer (file names and
    scores, every picture loaded); "nearest training images" on a gallery picture that copies a training image shows
    that image first at score 1.000, with the keyboard focus on the results; a bad query is one line."""
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    index = ClipIndex.build(tiny_shapes, ClipScorer.load(tiny_clip_run[0]), tiny_clip_run[0], progress=False)
    searcher = Searcher.load(index.save(tmp_path / "index.safetensors"))
    copied = index.files[7]
    memorised, = Gallery(tmp_path / "data").add_all([Image.open(tiny_shapes / copied)], [metadata(3)], job_id="j")
    app = create_app(Pipeline.load(tiny_diffusion_run), tmp_path / "data", searcher=searcher)
    with running(app) as url, sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            expect(page.locator("#search-size")).to_have_text("(48 images)")
            expect(page.get_by_role("searchbox", name="Words")).to_be_visible()
            page.get_by_role("searchbox", name="Words").press_sequentially("a red circle")
            page.keyboard.press("Enter")
            thumbs = page.locator("#search-results li")
            expect(thumbs).to_have_count(8)
            page.wait_for_function("() => [...document.querySelectorAll('#search-results img')]"
                                   ".every((img) => img.complete && img.naturalWidth === 16)")
            api = httpx.post(url + "/api/search", json={"text": "a red circle"}).json()["results"]
            assert page.locator("#search-results .file").all_text_contents() == [h["file"] for h in api]
            assert page.locator("#search-results .score").all_text_contents() == [f"{h['score']:.3f}" for h in api]
            assert page.locator("#search-results img").first.get_attribute("alt") == api[0]["text"]
            expect(page.locator("#search-status")).to_contain_text("8 training images nearest to “a red circle”")

            page.fill("#search-k", "3")
            page.locator(f"#image-{memorised['id']} button.nearest").click()
            expect(thumbs).to_have_count(3)
            expect(page.locator("#search-results .file").first).to_have_text(copied)
            expect(page.locator("#search-results .score").first).to_have_text("1.000")
            assert page.evaluate("document.activeElement.id") == "search-results"
            page.keyboard.press("Tab")  # from the results, the keyboard reaches the first thumbnail's link
            assert page.evaluate("document.activeElement.getAttribute('href')") == \
                f"/api/search/image/{index.files.index(copied)}"
            shot = tmp_path / "serve_search.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")

            page.set_input_files("#search-file", str(tiny_shapes / index.files[20]))  # search by a picture file
            expect(page.locator("#search-status")).to_contain_text(f"nearest to {Path(index.files[20]).name}")
            expect(page.locator("#search-results .score").first).to_have_text("1.000")
            page.fill("#search-text", "   ")
            page.click("#search-button")
            expect(page.locator("#search-status")).to_have_text("text: the search text is empty")
            expect(thumbs).to_have_count(0)
            assert not errors, errors
        finally:
            browser.close()


def test_typing_shows_a_live_preview_and_a_pause_supersedes_the_last(tiny_diffusion_run, tmp_path):
    """Issue 18: the page previews while the prompt is typed — one draft per pause (not per key), shown beside the
    form and kept out of the gallery; a new pause cancels the draft still running."""
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    pipe = SteppedPipe(Pipeline.load(tiny_diffusion_run))  # the worker holds each draft at its first step
    app = create_app(pipe, tmp_path / "data")

    def is_draft(r):
        return r.method == "POST" and r.url.endswith("/api/generate")

    with running(app) as url, sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            errors, drafts = [], []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: drafts.append(json.loads(r.post_data)) if is_draft(r) else None)
            page.goto(url)
            expect(page.locator("#model")).to_contain_text(pipe.model_hash)
            page.fill("#steps", "20")
            with page.expect_response(lambda r: is_draft(r.request)) as first:
                page.locator("#prompt").press_sequentially("a red circle", delay=20)  # keys 20 ms apart: one pause
            first_id = first.value.json()["id"]
            expect(page.locator("#draft-status")).to_have_text("preview…")
            page.wait_for_timeout(800)  # twice the pause: no second request for the same words
            assert len(drafts) == 1, drafts
            assert drafts[0]["draft"] is True and drafts[0]["n"] == 1 and drafts[0]["steps"] == 10  # ≤ the draft steps
            assert drafts[0]["seed"] == 0 and drafts[0]["width"] == 16  # a random seed is previewed as 0

            with page.expect_request(lambda r: r.method == "DELETE" and r.url.endswith(f"/api/jobs/{first_id}")), \
                    page.expect_response(lambda r: is_draft(r.request)) as second:
                page.locator("#prompt").press_sequentially(" and a square", delay=20)
            assert drafts[1]["prompt"] == "a red circle and a square"
            pipe.allow(math.inf)
            expect(page.locator("#draft-status")).to_have_text("preview · 16×16 · 10 steps · seed 0", timeout=60_000)
            assert page.locator("#draft-image").get_attribute("src").startswith("data:image/png;base64,")
            jobs = {i: httpx.get(f"{url}/api/jobs/{i}").json() for i in (first_id, second.value.json()["id"])}
            assert [j["status"] for j in jobs.values()] == ["cancelled", "done"]
            assert page.locator("#draft-image").get_attribute("src") == jobs[second.value.json()["id"]]["draft_image"]
            assert httpx.get(f"{url}/api/gallery").json()["total"] == 0 and page.locator("#gallery .card").count() == 0

            page.uncheck("#live")  # off: no preview, none asked for
            page.locator("#prompt").press_sequentially("!", delay=20)
            page.wait_for_timeout(800)
            assert len(drafts) == 2 and page.locator("#draft").is_hidden()
            assert errors == []
        finally:
            browser.close()
