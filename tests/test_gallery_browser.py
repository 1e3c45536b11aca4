"""The gallery in a real browser: headless Chromium opens the pages from file://.

Every image must load, the console must stay clean, and no hostile caption, file name or prompt
may run as a script. Screenshots go to ``test-artifacts/`` (ignored by git, kept by CI).
"""

import shutil
from pathlib import Path

import pytest

from diffattr.gallery import write_gallery

from .test_gallery import HOSTILE, HOSTILE_ID, HOSTILE_SCRIPT, build_run

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = next(
    (path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None
)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary on PATH (Debian: apt-get install chromium; .ci/run installs it)",
)

IMAGES = "Array.from(document.images).map(i => ({src: i.src, complete: i.complete, width: i.naturalWidth}))"


def test_gallery_pages_load_cleanly_in_chromium(tmp_path, tiny_model):
    from playwright.sync_api import sync_playwright

    run = build_run(tmp_path, tiny_model)
    index = write_gallery(run["run_dir"], tmp_path / "site", progress=False)
    pages = {
        "index": index,
        "query": index.parent / f"query-{run['results'][0].query_id}.html",  # hostile file name and prompt
        "audit": index.parent / "audit.html",
    }
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            problems = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("requestfailed", lambda r: problems.append(f"failed to load {r.url}: {r.failure} [{page.url}]"))
            page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
            for name, path in pages.items():
                page.goto(path.as_uri(), wait_until="load")
                images = page.evaluate(IMAGES)
                assert images, f"{name}: no images"
                broken = [image["src"] for image in images if not (image["complete"] and image["width"] > 0)]
                assert not broken, f"{name}: images that did not load: {broken}"
                assert page.evaluate("typeof window.pwned") == "undefined", f"{name}: an injected script ran"
                assert page.evaluate("document.querySelectorAll('script, [onerror]').length") == 0
                page.screenshot(path=ARTIFACTS / f"gallery-{name}.png", full_page=True)
                if name != "index":
                    text = page.text_content("body")
                    assert HOSTILE in text and HOSTILE_SCRIPT in text, f"{name}: hostile strings not shown as text"
                    assert HOSTILE_ID in text
            # links work from file://: follow the first query card and the audit link
            page.goto(index.as_uri())
            page.click("a.query-card >> nth=0")
            page.wait_for_load_state("load")
            assert page.url == pages["query"].as_uri()
            page.goto(index.as_uri())
            page.click("text=memorization audit >> nth=0")
            page.wait_for_load_state("load")
            assert page.url == pages["audit"].as_uri()
            assert not problems, problems
        finally:
            browser.close()
    assert all((ARTIFACTS / f"gallery-{name}.png").stat().st_size > 1000 for name in pages)
