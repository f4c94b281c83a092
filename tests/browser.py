"""Helpers for tests that drive the real app: start `launch.py` in a subprocess, open headless Chromium."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(db: str, *extra: str, timeout: float = 180, preexec_fn=None):
    """Start the app as a user would (`python launch.py ...`); yield (url, process); stop it afterwards."""
    port = free_port()
    log = open(Path(db).with_suffix(".log"), "w+")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--db", db, "--port", str(port),
                             "--no-browser", *extra], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                            preexec_fn=preexec_fn)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            log.seek(0)
            if "RLHF Studio running at" in log.read():
                break
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the app exited early:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        else:
            raise RuntimeError("the app did not start in time")
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextmanager
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


# The page's state while it loads: "ready" once the Generate tab is there and no progress overlay covers a
# component; "failed: ..." where a page-load event failed (its overlay then shows "Error" and never clears, e.g.
# an event refused by a full queue: Gradio's "currently busy" pop-up); otherwise "" (still loading).
_PAGE_STATE = """() => {
  const shown = (t) => t.offsetParent !== null;
  const toasts = [...document.querySelectorAll('[data-testid=toast-body]')].filter(shown).map(t => t.innerText);
  const open = [...document.querySelectorAll('[data-testid=status-tracker]')]
    .filter(t => !t.classList.contains('hide') && shown(t));
  const failed = open.filter(t => /\\bError\\b/.test(t.innerText)).map(t => t.innerText);
  if (toasts.length || failed.length) return 'failed: ' + JSON.stringify({toasts, overlays: failed});
  return document.querySelector('#library') !== null && open.length === 0 ? 'ready' : '';
}"""


def open_app(page, url: str, timeout_ms: float = 180_000) -> None:
    """Go to the app and wait for its page-load events: until they finish, Gradio's progress overlays cover the
    components and take the clicks (on a loaded CI machine that lasted past Playwright's 30 s default). A page-load
    event that fails (an error pop-up, an overlay showing "Error") fails the test at once with what the page
    said, instead of waiting out the timeout for an overlay that never clears."""
    page.goto(url)
    state = page.wait_for_function(_PAGE_STATE, timeout=timeout_ms).json_value()
    if state != "ready":
        raise AssertionError(f"the page did not load cleanly: {state}")


def generate_in_page(page, prompt: str, max_new_tokens: int, seed: int) -> None:
    """Type a prompt into the Generate & Rate tab, set max new tokens and the seed, press Generate."""
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#max-new-tokens input[type=number]").fill(str(max_new_tokens))
    page.locator("#max-new-tokens input[type=number]").press("Enter")
    page.locator("#seed textarea, #seed input").first.fill(str(seed))
    page.click("#generate-btn")
