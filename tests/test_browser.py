"""Load every page of the built book in headless Chromium and check what a reader would see.

Run after ``jupyter-book build .``: ``pytest -m browser``. Skipped only when Chromium is
missing and the ``CI`` variable is unset; under CI a missing browser or book is a failure.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Raw TeX that MathJax should have replaced: \( ... \), \[ ... \], $$ ... $$, $ ... $.
RAW_TEX = re.compile(r"\\\(|\\\[|\$\$|(?<![\w$])\$[^\s$][^$\n]*\$(?![\w$])")

pytestmark = pytest.mark.browser

if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)


def toc_pages() -> list[str]:
    """Every page the table of contents lists, as paths relative to the HTML root."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [chapter["file"] for chapter in part["chapters"]]
    return [f"{name}.html" for name in files]


PAGES = toc_pages()


@pytest.fixture(scope="module")
def server():
    """Serve the built HTML on 127.0.0.1 from a background thread."""
    assert CHROMIUM is not None, "CI is set but Chromium is missing: apt-get install chromium"
    assert (HTML / "index.html").is_file(), "build the book first: jupyter-book build ."
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        yield context
        context.close()


WAIT_FOR_MATHJAX = """async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  for (const img of document.images) { img.loading = "eager"; }
  await Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)));
}"""

INSPECT = """() => {
  const visible = document.querySelector("main") || document.body;
  const clone = visible.cloneNode(true);
  clone.querySelectorAll("pre, code, script, style, mjx-container, .highlight")
       .forEach(e => e.remove());
  return {
    mathElements: document.querySelectorAll(".math").length,
    untypeset: Array.from(document.querySelectorAll(".math"))
                    .filter(e => !e.querySelector("mjx-container")).map(e => e.textContent),
    mathjaxErrors: document.querySelectorAll("mjx-merror, .MathJax_Error").length,
    brokenImages: Array.from(document.images)
                       .filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
    text: clone.innerText,
    sidebar: Array.from(document.querySelectorAll("nav.bd-links a.reference"))
                  .map(a => a.href),
  };
}"""


# reStructuredText or MyST that reached the reader as text: an autodoc directive parsed as
# Markdown, a role or a glue key that did not resolve.
RAW_MARKUP = re.compile(r"\.\. py:|:param\b|:math:|\{automodule\}|\{glue:\w+\}|\{numref\}")

READING = """() => {
  const main = document.querySelector("main");
  // shown to a reader who has not opened any collapsed dropdown
  const visible = (e) => e.offsetParent !== null && !e.closest("details:not([open])");
  const scrolls = Array.from(main.querySelectorAll("*")).filter(e =>
      visible(e) && e.scrollWidth > e.clientWidth + 1 && e.clientWidth > 0 &&
      ["auto", "scroll"].includes(getComputedStyle(e).overflowX));
  const describe = (e) => `${e.tagName.toLowerCase()}.${e.className}`.slice(0, 60) +
      ` (${e.scrollWidth} px in ${e.clientWidth} px): ` + e.textContent.trim().slice(0, 60);
  const images = Array.from(main.querySelectorAll(".cell_output img, figure img"));
  const code = Array.from(main.querySelectorAll(".cell_input")).filter(visible)
      .reduce((total, e) => total + e.getBoundingClientRect().height, 0);
  return {
    scrolling: scrolls.map(describe),
    shrunk: images.filter(i => i.naturalWidth > 0 && i.width < 0.6 * i.naturalWidth)
                  .map(i => `${i.src.split("/").pop()}: ${i.width} of ${i.naturalWidth} px`),
    uncaptioned: images.filter(i => !(i.closest("figure") &&
                                      i.closest("figure").querySelector("figcaption")))
                       .map(i => i.src.split("/").pop()),
    codeShare: code / main.getBoundingClientRect().height,
  };
}"""
# Pages that still fail the reading checks below; fixing them is issue 11's work.
NOT_YET_READABLE: set[str] = set()
CODE_SHARE_LIMIT = 0.2  # code at most a fifth of a chapter's rendered height


def reading_pages() -> list:
    return [
        pytest.param(page, marks=pytest.mark.xfail(strict=True, reason="not yet fixed (issue 11)"))
        if page in NOT_YET_READABLE
        else page
        for page in PAGES
    ]


@pytest.mark.parametrize("page", reading_pages())
def test_page_reads_without_scrolling_shrinking_or_raw_markup(page, server, browser):
    """Nothing in the main column scrolls sideways, no figure is shrunk below 60 % of its
    width or lacks a caption, no markup reaches the reader, and code is at most a fifth of a
    chapter's height."""
    tab = browser.new_page()
    tab.goto(f"{server}/{page}", wait_until="load")
    tab.evaluate(WAIT_FOR_MATHJAX)
    text = tab.evaluate(INSPECT)["text"]
    found = tab.evaluate(READING)
    tab.close()
    raw = RAW_MARKUP.findall(text)
    assert not raw, f"{page}: markup shown as text: {raw[:5]}"
    assert not found["scrolling"], f"{page}: scrolls sideways: {found['scrolling'][:5]}"
    assert not found["shrunk"], f"{page}: figures shrunk below 60 %: {found['shrunk']}"
    assert not found["uncaptioned"], f"{page}: figures without caption: {found['uncaptioned']}"
    if page.removeprefix("book/")[:2].isdigit():  # a chapter
        share = found["codeShare"]
        assert share <= CODE_SHARE_LIMIT, f"{page}: code is {share:.0%} of the page's height"


@pytest.mark.parametrize("page", PAGES)
def test_page_renders(page, server, browser):
    tab = browser.new_page()
    problems: list[str] = []
    tab.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: problems.append(str(e)))
    tab.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    response = tab.goto(f"{server}/{page}", wait_until="load")
    assert response is not None and response.ok, f"{page}: HTTP {response and response.status}"
    tab.evaluate(WAIT_FOR_MATHJAX)
    found = tab.evaluate(INSPECT)

    shot = SCREENSHOTS / page.replace("/", "__").replace(".html", ".png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(shot), full_page=True, timeout=120_000)

    assert not problems, f"{page}: JavaScript errors: {problems}"
    assert not found["untypeset"], f"{page}: formulas left untypeset: {found['untypeset'][:5]}"
    assert found["mathjaxErrors"] == 0, f"{page}: {found['mathjaxErrors']} MathJax error nodes"
    raw = RAW_TEX.findall(found["text"])
    assert not raw, f"{page}: raw TeX left in the text: {raw[:5]}"
    assert not found["brokenImages"], f"{page}: images that did not load: {found['brokenImages']}"

    sidebar = {link.split("#")[0] for link in found["sidebar"]}
    missing = {f"{server}/{p}" for p in PAGES if p != toc_pages()[0]} - sidebar
    assert not missing, f"{page}: the sidebar does not link {sorted(missing)}"
    for link in sorted(sidebar):
        status = tab.request.get(link).status
        assert status == 200, f"{page}: sidebar link {link} answers HTTP {status}"
    tab.close()


def test_book_has_math_and_figures(server, browser):
    """Guard against a vacuous pass: the book as a whole typesets math and shows images."""
    counts = {"math": 0, "images": 0}
    tab = browser.new_page()
    for page in PAGES:
        tab.goto(f"{server}/{page}", wait_until="load")
        tab.evaluate(WAIT_FOR_MATHJAX)
        counts["math"] += tab.evaluate("document.querySelectorAll('mjx-container').length")
        counts["images"] += tab.evaluate("document.querySelectorAll('main img').length")
    tab.close()
    assert counts["math"] > 0, "no formula was typeset anywhere in the book"
    assert counts["images"] > 0 or len(PAGES) <= 3, "chapters are built but show no figure"
