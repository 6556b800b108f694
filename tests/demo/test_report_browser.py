"""The demo's report.html in a real browser (Debian's chromium, headless, driven by Playwright):
every image must load. A copy of the page with one broken link proves the check can fail."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (.ci/run installs it); never a downloaded browser
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium")

IMAGES_JS = """() => Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete,
                                                      width: i.naturalWidth, height: i.naturalHeight}))"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def _images(browser, page_path: Path) -> tuple[list[dict], str]:
    page = browser.new_page()
    try:
        page.goto(page_path.as_uri(), wait_until="load")
        return page.evaluate(IMAGES_JS), page.title()
    finally:
        page.close()


def test_every_image_of_the_report_loads(quick_demo, browser):
    html = quick_demo["html"]
    tags = re.findall(r"<img ", html.read_text())
    images, title = _images(browser, html)
    assert title == "vpit demo report"
    assert len(images) == len(tags) >= 10 + 3 * quick_demo["config"].prompts
    broken = [i["src"] for i in images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    sizes = {i["src"]: (i["width"], i["height"]) for i in images}
    assert sizes["gallery/00-true.png"] == (64, 64) and sizes["gallery/00-generated.png"] == (32, 32)


def test_a_broken_image_link_is_caught(quick_demo, browser):
    html = quick_demo["html"]
    page = html.read_text().replace('src="train/run/loss.png"', 'src="train/run/no-such-loss.png"', 1)
    assert "no-such-loss.png" in page
    broken_page = html.with_name("report-broken-link.html")  # beside the real one, so the other links resolve
    broken_page.write_text(page)
    try:
        images, _ = _images(browser, broken_page)
    finally:
        broken_page.unlink()
    broken = [i["src"] for i in images if not (i["complete"] and i["width"] > 0)]
    assert broken == ["train/run/no-such-loss.png"]
