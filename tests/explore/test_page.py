"""index.html in a real browser: Debian's chromium, headless, through Selenium and
chromedriver. The page must load from disk with no console error and show every image on it;
the same check on a page with one missing image fails, so it is not vacuous. Skipped, with the
reason, where chromium, chromedriver or selenium is missing (.ci/run installs them)."""

from __future__ import annotations

import html.parser
import shutil
from pathlib import Path

import pytest

from lowres_ssl.explore import explore

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    for tool in (CHROMIUM, CHROMEDRIVER):
        if not Path(tool).is_file():
            pytest.skip(f"{tool} is missing: apt-get install chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.fixture(scope="module")
def browser():
    driver = _browser()
    yield driver
    driver.quit()


def problems(browser, page: Path) -> list[str]:
    """What is wrong with the page as the browser shows it: console errors and images that
    did not load."""
    browser.get(page.resolve().as_uri())
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    shown = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && "
        "i.naturalWidth > 0])"
    )
    assert shown, "the page has no image"
    return errors + [f"image not shown: {src}" for src, ok in shown if not ok]


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.targets += [v for k, v in attrs if k in ("href", "src") and v]


@pytest.fixture(scope="module")
def page(labeled, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("page") / "out"
    explore(str(weights), labeled, out, groups=3, cache_dir=out.parent / "cache", num_workers=0)
    return out / "index.html"


def test_the_page_loads_without_errors_and_shows_every_image(browser, page):
    assert problems(browser, page) == []
    assert "<script" not in page.read_text().lower()  # no JavaScript at all


def test_every_link_and_image_is_a_file_beside_the_page(page):
    parser = _Links()
    parser.feed(page.read_text())
    local = [t for t in parser.targets if "://" not in t]
    assert local == parser.targets  # nothing from the network
    assert {"clusters.csv", "duplicates.csv", "neighbours.png", "map.png"} <= set(local)
    assert all((page.parent / t).is_file() for t in local)


def test_a_missing_image_is_caught(browser, page, tmp_path):
    broken = tmp_path / "copy"
    shutil.copytree(page.parent, broken)
    (broken / "map.png").unlink()
    found = problems(browser, broken / "index.html")
    assert any("map.png" in p for p in found)
