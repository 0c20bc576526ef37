"""The page in headless Chromium (Debian's, driven by Playwright): prompt → live denoising → a gallery that survives
a reload, with working "copy settings", "download PNG" and "reuse seed"."""
import json
import math
import shutil
from pathlib import Path

import httpx
import pytest
from test_serve_api import SteppedPipe

from carrara.pipeline import Pipeline
from carrara.png import read_png_metadata
from carrara.serve.app import create_app, running

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
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
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
            page.wait_for_function("() => [...document.querySelectorAll('#gallery img')]"
                                   ".every((img) => img.naturalWidth === 16)")
            shot = tmp_path / "serve_page.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")

            newest = page.locator("#gallery .card").first
            newest.locator("button.copy").click()
            copied = json.loads(page.evaluate("navigator.clipboard.readText()"))
            assert copied["prompt"] == "a red circle" and copied["steps"] == 8 and copied["n"] == 1
            newest.locator("button.reuse").click()
            assert page.input_value("#seed") == str(copied["seed"]) and not page.is_checked("#random")
            href = newest.locator("a.download").get_attribute("href")
            (tmp_path / "download.png").write_bytes(httpx.get(url + href).content)
            assert read_png_metadata(tmp_path / "download.png")["seed"] == copied["seed"]
            assert not errors, errors
        finally:
            pipe.allow(math.inf)
            browser.close()
