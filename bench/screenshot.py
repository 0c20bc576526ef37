"""The README's picture of `carrara serve`: the real page with the default model, after a few prompts.

Starts the app in-process on a free loopback port with a fresh gallery, drives Debian's chromium headless with
Playwright (as tests/test_serve_browser.py does), generates a few prompts, types one more (its live preview shows)
and saves a screenshot.

    python bench/screenshot.py [--model default] [--out docs/images/serve.png]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile

from carrara.pipeline import Pipeline
from carrara.serve.app import create_app, running

PROMPTS = [("a happy kitty", 2), ("a red sports car", 2), ("a snowman in the snow", 2), ("red heart", 2)]
PREVIEW = "a slice of pizza"  # typed last: the page's live preview of it is in the picture


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--out", default="docs/images/serve.png")
    args = p.parse_args()
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as data:
        app = create_app(Pipeline.load(args.model), data)
        with running(app) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 860})
            page.goto(url)
            total = 0
            for prompt, n in PROMPTS:
                page.fill("#prompt", prompt)
                page.fill("#n", str(n))
                page.click("#generate")
                total += n
                expect(page.locator("#gallery .card")).to_have_count(total, timeout=120_000)
            expect(page.locator("#jobs .step-counter")).to_have_count(0, timeout=30_000)  # the live panel closes
            page.fill("#prompt", "")
            page.locator("#prompt").press_sequentially(PREVIEW, delay=40)  # typing: the live preview follows
            expect(page.locator("#draft")).to_be_visible(timeout=30_000)
            expect(page.locator("#draft-status")).to_contain_text("preview ·", timeout=120_000)
            page.wait_for_function("() => [...document.querySelectorAll('#gallery img')].every((i) => i.complete)")
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
