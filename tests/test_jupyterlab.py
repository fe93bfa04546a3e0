"""Open chapter 1 in JupyterLab, as a reader does after ``jupyter lab book/``, and run it.

The test starts ``jupyter lab`` on 127.0.0.1 (free port, a token, fresh runtime, config,
settings and workspaces directories), opens ``01_reparametrization.ipynb`` from the file
browser in headless Chromium, clears the stored outputs from the Edit menu, runs every cell
from the Run menu and checks what the reader sees: every code cell ran, none shows an error,
the figures are drawn, the first printed numbers are the stored ones, and no request left
127.0.0.1. Nothing is saved (autosave is off in the fresh settings and the page is closed
without saving), so the notebook file and ``git status`` are the same afterwards.

Run with ``pytest -m browser``; like ``test_browser.py``, it is skipped only when Chromium is
missing and the ``CI`` variable is unset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers import checkout_env, nbval_sanitize, stdout
from test_browser import CHROMIUM, CHROMIUM_FLAGS  # skips this module too when it skips

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
CHAPTER = "01_reparametrization.ipynb"
SCREENSHOT = ROOT / "_build" / "screenshots" / "jupyterlab_ch1.png"
PRINTING_CELLS = 4  # how many of the first printing cells must print the stored text
START_TIMEOUT = 90  # seconds for the server to answer
RUN_TIMEOUT = 300  # seconds for Run All Cells (chapter 1 takes well under 2 minutes)
STOP_TIMEOUT = 30  # seconds for the server to exit after SIGTERM, before SIGKILL

pytestmark = pytest.mark.browser

# The reader's defaults, less what would change the file or hide cells from the DOM: no autosave
# (the test must not write the notebook), every cell attached (so every output can be
# inspected), and no news toast over the screenshot (by default JupyterLab only asks).
SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}

# The open notebook as JupyterLab holds it (nbformat JSON), its kernel and cells' states.
# ``window.jupyterapp`` exists because the server runs with ``expose_app_in_browser``.
NOTEBOOK_STATE = """(name) => {
  const app = window.jupyterapp;
  if (!app) { return null; }
  for (const widget of app.shell.widgets("main")) {
    if (!widget.context || widget.context.path !== name || !widget.content.model) { continue; }
    const kernel = widget.sessionContext.session && widget.sessionContext.session.kernel;
    return {
      notebook: widget.content.model.toJSON(),
      kernel: kernel ? kernel.status : null,
      running: widget.content.widgets.filter(
        c => c.model.type === "code" && c.model.executionState === "running").length,
      dirty: widget.context.model.dirty,
    };
  }
  return null;
}"""

OUTPUTS = ".jp-NotebookPanel .jp-OutputArea-output"
SHOWN_OUTPUTS = """(selector) => {
  const outputs = Array.from(document.querySelectorAll(selector));
  const images = Array.from(document.querySelectorAll(selector + " img"));
  return {
    tracebacks: outputs.map(o => o.innerText)
                       .filter(t => /Traceback \\(most recent call last\\)/.test(t)),
    images: images.map(i => ({complete: i.complete, width: i.naturalWidth})),
  };
}"""

WAIT_FOR_IMAGES = """async (selector) => {
  const images = Array.from(document.querySelectorAll(selector + " img"));
  await Promise.all(images.map(i => i.decode().catch(() => null)));
}"""


# Scroll so that the screenshot shows the code cell before the first figure (its prompt and
# printed numbers) at the top, and the figure below it.
FRAME_FIRST_FIGURE = """(selector) => {
  const cell = document.querySelector(selector + " img").closest(".jp-Cell");
  const before = cell.previousElementSibling || cell;
  before.scrollIntoView({block: "start"});
}"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def git_status() -> str:
    """Tracked changes, untracked and ignored files under ``book/`` (stray files included)."""
    return subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "book/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@contextlib.contextmanager
def jupyterlab(home: Path):
    """``jupyter lab`` serving ``book/`` on 127.0.0.1; yields (base URL, token, runtime dir)."""
    env = checkout_env()  # the kernel imports this checkout's natlib
    dirs = {
        "JUPYTER_RUNTIME_DIR": "runtime",
        "JUPYTER_CONFIG_DIR": "config",
        "JUPYTER_DATA_DIR": "data",
        "JUPYTERLAB_SETTINGS_DIR": "settings",
        "JUPYTERLAB_WORKSPACES_DIR": "workspaces",
        "IPYTHONDIR": "ipython",
    }
    for variable, name in dirs.items():
        (home / name).mkdir(parents=True)
        env[variable] = str(home / name)
    for plugin, values in SETTINGS.items():
        path = home / "settings" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    token = secrets.token_hex(16)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={BOOK}",
        # JupyterLab writes a checkpoint of each notebook it opens; keep it out of book/.
        f"--FileCheckpoints.checkpoint_dir={home / 'checkpoints'}",
        "--LabApp.expose_app_in_browser=True",
    ]
    if os.geteuid() == 0:  # CI runs as root, which Jupyter refuses unless told
        command.append("--allow-root")
    log = home / "server.log"
    with log.open("w") as sink:
        server = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert server.poll() is None, f"jupyter lab exited:\n{log.read_text()[-3000:]}"
            request = urllib.request.Request(
                f"{base}/api/status", headers={"Authorization": f"token {token}"}
            )
            try:
                with direct.open(request, timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, (
                f"jupyter lab did not answer in {START_TIMEOUT} s:\n{log.read_text()[-3000:]}"
            )
            time.sleep(0.5)
        yield base, token, home / "runtime"
    finally:
        server.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            server.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


@contextlib.contextmanager
def chromium(profile: Path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1300},
        )
        try:
            yield context
        finally:
            context.close()


def stored_code_cells() -> list[dict]:
    cells = json.loads((BOOK / CHAPTER).read_text())["cells"]
    return [cell for cell in cells if cell["cell_type"] == "code"]


def menu(page, title: str, item: str) -> None:
    """Choose ``title > item`` from JupyterLab's menu bar, as a reader clicks it."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{title}$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{item}$")).click()


def wait_for(page, predicate, timeout: float, what: str) -> dict:
    """Poll the notebook's state once a second until ``predicate(state)``, at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        state = page.evaluate(NOTEBOOK_STATE, CHAPTER)
        if state is not None and predicate(state):
            return state
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s; last state {state}"
        page.wait_for_timeout(1000)


def has_error(state: dict) -> bool:
    return any(
        output["output_type"] == "error"
        for cell in state["notebook"]["cells"]
        for output in cell.get("outputs", [])
    )


def run_finished(state: dict) -> bool:
    cells = [c for c in state["notebook"]["cells"] if c["cell_type"] == "code"]
    counted = all(isinstance(c["execution_count"], int) for c in cells)
    return has_error(state) or (counted and state["running"] == 0 and state["kernel"] == "idle")


def test_chapter_1_runs_in_jupyterlab(tmp_path, record_property):
    assert CHROMIUM is not None, "CI is set but Chromium is missing: apt-get install chromium"
    status_before, digest = git_status(), hashlib.sha256((BOOK / CHAPTER).read_bytes()).digest()
    stored = stored_code_cells()
    requests: list[str] = []
    page_errors: list[str] = []

    with (
        jupyterlab(tmp_path / "lab") as (base, token, runtime),
        chromium(tmp_path / "chromium") as browser,
    ):
        browser.on("request", lambda r: requests.append(r.url))
        page = browser.new_page()
        page.on("websocket", lambda ws: requests.append(ws.url))
        page.on("pageerror", lambda e: page_errors.append(str(e)))
        page.goto(f"{base}/lab?token={token}", wait_until="load")

        # Open the chapter from the file browser and wait for its kernel.
        page.locator(".jp-DirListing-item", has_text=CHAPTER).dblclick(timeout=60_000)
        wait_for(
            page,
            lambda s: s["kernel"] == "idle" and len(s["notebook"]["cells"]) > 0,
            START_TIMEOUT,
            "the notebook opens with an idle kernel",
        )
        page.locator(".jp-NotebookPanel .jp-Cell").first.click()

        # Clear the stored outputs, so that every output checked below is a fresh one.
        menu(page, "Edit", "Clear Outputs of All Cells")
        cleared = wait_for(
            page,
            lambda s: all(
                c["execution_count"] is None and not c["outputs"]
                for c in s["notebook"]["cells"]
                if c["cell_type"] == "code"
            ),
            30,
            "Edit > Clear Outputs of All Cells",
        )
        assert len([c for c in cleared["notebook"]["cells"] if c["cell_type"] == "code"]) == len(
            stored
        )

        start = time.monotonic()
        menu(page, "Run", "Run All Cells")
        state = wait_for(page, run_finished, RUN_TIMEOUT, "Run > Run All Cells")
        seconds = time.monotonic() - start
        record_property("run_all_seconds", round(seconds, 1))
        print(f"{CHAPTER}: Run All Cells finished in {seconds:.1f} s")

        page.evaluate(WAIT_FOR_IMAGES, OUTPUTS)
        shown = page.evaluate(SHOWN_OUTPUTS, OUTPUTS)
        page.evaluate(FRAME_FIRST_FIGURE, OUTPUTS)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
        page.close()  # without saving: beforeunload handlers do not run, nothing is written

    # Every code cell ran, once, in order, in the fresh kernel, and none failed.
    cells = [c for c in state["notebook"]["cells"] if c["cell_type"] == "code"]
    errors = [
        (i, output.get("ename"), output.get("evalue"))
        for i, cell in enumerate(cells)
        for output in cell["outputs"]
        if output["output_type"] == "error"
    ]
    assert not errors, f"{CHAPTER}: code cells raised {errors}"
    counts = [c["execution_count"] for c in cells]
    assert counts == list(range(1, len(cells) + 1)), f"execution counts {counts}"
    assert not shown["tracebacks"], f"outputs show tracebacks: {shown['tracebacks'][:2]}"
    assert not page_errors, f"JavaScript errors in JupyterLab: {page_errors}"

    # The figures are drawn: as many images as the stored notebook has, all decoded.
    stored_figures = sum(
        "image/png" in output.get("data", {}) for cell in stored for output in cell["outputs"]
    )
    assert stored_figures > 0
    assert len(shown["images"]) == stored_figures, (
        f"{len(shown['images'])} images shown, the stored notebook has {stored_figures}"
    )
    assert all(i["complete"] and i["width"] > 0 for i in shown["images"]), shown["images"]

    # The first printed numbers are the stored ones.
    printing = [i for i, cell in enumerate(stored) if stdout(cell["outputs"])][:PRINTING_CELLS]
    assert len(printing) == PRINTING_CELLS
    for i in printing:
        assert nbval_sanitize(stdout(cells[i]["outputs"])) == nbval_sanitize(
            stdout(stored[i]["outputs"])
        ), (
            f"code cell {i} printed\n{stdout(cells[i]['outputs'])}\nbut the stored notebook has\n"
            f"{stdout(stored[i]['outputs'])}"
        )

    # Offline: every request of the page, web sockets included, stayed on 127.0.0.1.
    assert any(url.startswith("ws://127.0.0.1") for url in requests), "no kernel web socket seen"
    away = sorted({url for url in requests if urlsplit(url).hostname != "127.0.0.1"})
    assert not away, f"requests left 127.0.0.1: {away}"

    # The server shut its kernel down, and nothing was written into book/.
    assert not list(runtime.glob("kernel-*.json")), "a kernel outlived the server"
    assert hashlib.sha256((BOOK / CHAPTER).read_bytes()).digest() == digest, "notebook saved"
    assert git_status() == status_before, "running the chapter changed git status in book/"
