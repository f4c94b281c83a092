"""Cases 7 and 9: the real app (`python launch.py --auth ...`) on a database full of hostile text, driven by
headless Chromium, and its HTTP routes probed without and with a login.

Hostile text is stored through the Studio API; the app must show it as text (no script runs, no markup
renders), never contact another host, and give it back byte for byte."""
import http.client
import json
import time
import urllib.parse
from pathlib import Path

import pytest

from components.models import cache_dir
from tests.browser import browser, running_app
from tests.studios import open_studio

pytestmark = [pytest.mark.slow, pytest.mark.browser]

USER, PASSWORD = "alice", "correct-horse-battery"
BEACON_HOST = "198.51.100.7"          # TEST-NET-2: documentation only, never routed
ZW_RTL = "zero\u200bwidth\u200d joiner \u202eevil-rtl\u202c \u2066isolate\u2069 \u200fmark"
HOSTILE_PROMPT = ("<script>window.__xss=1</script> Tell me about <img src=x onerror=\"window.__xss=2\"> "
                  "[a link](javascript:window.__xss=3) and ![x](http://198.51.100.7/beacon.png) " + ZW_RTL)
HOSTILE_REWRITE = ("**Corrected:** <script>window.__xss=4</script>\n<img src=x onerror=\"window.__xss=5\">\n"
                   "[click me](javascript:window.__xss=6)\n![beacon](http://198.51.100.7/beacon.png)\n"
                   "<iframe src=\"javascript:window.__xss=7\"></iframe>\n" + ZW_RTL)
HOSTILE_CRITIQUE = "<b onmouseover=\"window.__xss=8\">bold</b> ![t](http://198.51.100.7/c.png) " + ZW_RTL
NUL_PROMPT = "before\x00after NUL"
PLAIN = ["A plain prompt about rain", "<svg onload=window.__xss=9>svg prompt</svg> " + ZW_RTL, NUL_PROMPT]


@pytest.fixture(scope="module")
def hostile_db(tmp_path_factory, lm):
    path = str(tmp_path_factory.mktemp("hostile") / "hostile.duckdb")
    with open_studio(path, lm) as s:
        cs = s.generate(HOSTILE_PROMPT, n=2, max_new_tokens=4, seed=0)
        s.rate(cs[0].id, 5)
        s.thumbs(cs[1].id, up=False, tags=["harmful"])
        out = s.critique(cs[1].id, HOSTILE_CRITIQUE, rewrite=HOSTILE_REWRITE)
        s.add_prompts(PLAIN)
        s.reward.wait_idle(60)
    return path, cs[0].prompt_id, out["rewrite_completion_id"]


@pytest.fixture(scope="module")
def app(hostile_db):
    with running_app(hostile_db[0], "--auth", f"{USER}:{PASSWORD}") as (url, proc):
        yield url, proc, hostile_db


# ------------------------------------------------------------------------------------------------ case 7
def _guard_network(page, url):
    """Abort and record every request that is not for the app itself (nothing leaves 127.0.0.1)."""
    own = urllib.parse.urlsplit(url).netloc
    blocked = []

    def handle(route):
        req_url = route.request.url
        parts = urllib.parse.urlsplit(req_url)
        if parts.scheme in ("data", "blob") or parts.netloc == own:
            route.continue_()
        else:
            blocked.append(req_url)
            route.abort()
    page.route("**/*", handle)
    return blocked


def _no_injection(page, where):
    state = page.evaluate("""() => ({
        xss: window.__xss,
        scripts: [...document.querySelectorAll('script')].filter(s => s.textContent.includes('__xss')).length,
        handlers: [...document.querySelectorAll('[onerror],[onload],[onmouseover]')]
                    .filter(e => (e.getAttribute('onerror') || e.getAttribute('onload') ||
                                  e.getAttribute('onmouseover') || '').includes('__xss')).length,
        jslinks: [...document.querySelectorAll('a[href^="javascript:" i], iframe[src^="javascript:" i]')].length,
        beacons: [...document.querySelectorAll('img')].filter(i => (i.getAttribute('src') || '')
                    .includes('198.51.100.7')).length,
    })""")
    assert state == {"xss": None, "scripts": 0, "handlers": 0, "jslinks": 0, "beacons": 0}, (where, state)


def test_hostile_text_is_shown_as_text_everywhere(app):
    from playwright.sync_api import expect
    url, proc, (db, prompt_id, rewrite_id) = app
    with browser() as b:
        page = b.new_page(viewport={"width": 1500, "height": 1300})
        blocked = _guard_network(page, url)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
        page.goto(url)
        page.get_by_label("username").fill(USER)          # the login page
        page.get_by_label("password").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        expect(page.locator("#generate-btn")).to_be_visible(timeout=60_000)
        _no_injection(page, "after login")

        # prompt library -> "Load its completions"
        page.locator("#library input").click()
        page.get_by_role("option").filter(has_text="window.__xss=1").first.click()
        page.click("#load-prompt-btn")
        expect(page.locator("#status")).to_contain_text(f"completions of prompt #{prompt_id} loaded", timeout=60_000)
        assert page.locator("#prompt textarea").input_value() == HOSTILE_PROMPT       # exact, in the UI too
        shown = [page.locator(f"#comp-{i} textarea").input_value() for i in range(3)]
        assert HOSTILE_REWRITE in shown
        _no_injection(page, "Generate & Rate with the hostile prompt loaded")

        # History tab: labels, completions, prompts tables
        page.get_by_role("tab", name="History").click()
        page.click("#history-refresh")
        expect(page.locator("#history-summary")).to_contain_text("labels shown", timeout=60_000)
        shown_as_text = {"Completions": "<iframe src=", "Prompts": "<svg onload=", "Labels": "<b onmouseover="}
        for sub, literal in shown_as_text.items():
            page.get_by_role("tab", name=sub, exact=True).click()
            # the markup is on screen as literal text (rendered markup would not show its tag)
            expect(page.locator(f"#history-{sub.lower()}")).to_contain_text(literal, timeout=30_000)
            _no_injection(page, f"History / {sub}")
        # Dashboard tab
        page.get_by_role("tab", name="Dashboard").click()
        expect(page.locator("#dash-summary")).not_to_be_empty(timeout=60_000)
        page.wait_for_timeout(1000)
        _no_injection(page, "Dashboard")
        assert not errors, errors
    beacons = [u for u in blocked if BEACON_HOST in u]
    assert beacons == [], f"the page tried to load {beacons} (blocked by the test, never sent)"
    assert blocked == [], f"the page tried to contact other hosts (blocked by the test, never sent): {blocked}"



# ------------------------------------------------------------------------------------------------ case 9
def _request(url, method, path, body=None, headers=None, timeout=30):
    parts = urllib.parse.urlsplit(url)
    con = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        con.request(method, path, body=body, headers=headers or {})   # the path is sent verbatim
        r = con.getresponse()
        return r.status, r.read(), r.getheaders()
    finally:
        con.close()


def _login(url, password=PASSWORD):
    body = urllib.parse.urlencode({"username": USER, "password": password})
    status, data, headers = _request(url, "POST", "/login", body,
                                     {"Content-Type": "application/x-www-form-urlencoded"})
    cookies = [v.split(";", 1)[0] for k, v in headers if k.lower() == "set-cookie"]
    return status, "; ".join(cookies)


def _private_files(db: str) -> list[str]:
    """Files the app must never serve: the database, its WAL, the cached model weights, the source, the OS."""
    model = next(p for p in sorted(cache_dir().rglob("*.safetensors")) if p.is_file())
    root = Path(__file__).resolve().parents[2]
    return [db, db + ".wal", str(model), str(model.parent / "config.json"), str(root / "launch.py"), "/etc/passwd"]


def _probe_paths(db: str) -> list[str]:
    root = Path(__file__).resolve().parents[2]
    rel = str(Path(*([".."] * len(root.parts[1:]))) / db.lstrip("/"))     # the database, relative to the app's cwd
    paths = []
    for t in _private_files(db):
        q = urllib.parse.quote(t, safe="/")
        paths += [f"/gradio_api/file={q}", f"/gradio_api/file={t}", f"/file={q}",
                  f"/gradio_api/file={urllib.parse.quote(t, safe='')}"]
    paths += [
        f"/gradio_api/file={rel}",
        f"/gradio_api/file={rel.replace('/', '%2f')}",
        f"/gradio_api/file={rel.replace('..', '%2e%2e')}",
        f"/gradio_api/file={rel.replace('..', '%252e%252e')}",
        "/gradio_api/file=..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/gradio_api/file=%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        f"/gradio_api/file=//{db.lstrip('/')}",
        f"/gradio_api/file=file://{db}",
        f"/static/../../../../../..{db}",
        f"/assets/..%2f..%2f..%2f..%2f..%2f..{db}",
        "/gradio_api/file=launch.py",
        "/gradio_api/file=./launch.py",
    ]
    return paths


def _leaks(data: bytes, db: str) -> bool:
    """Does a response body start like one of the private files?"""
    if len(data) < 16:
        return False
    for f in _private_files(db):
        try:
            with open(f, "rb") as fh:
                head = fh.read(64)
        except OSError:
            continue
        if head and data[: len(head)] == head:
            return True
    return b"root:x:0:0" in data


def test_unauthenticated_requests_are_refused(app):
    url, _, (db, _, _) = app
    assert _request(url, "GET", "/")[0] == 200                               # the login page itself
    for path in ("/config", "/gradio_api/info", "/gradio_api/queue/status", "/gradio_api/api/generate"):
        status, data, _ = _request(url, "GET", path)
        assert status in (401, 403, 404, 405), (path, status, data[:200])
        assert status != 200
    boundary = "xyzBOUNDARY"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.txt\"\r\n"
            f"Content-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n").encode()
    status, data, _ = _request(url, "POST", "/gradio_api/upload", body,
                               {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status in (401, 403), (status, data[:200])
    for path in _probe_paths(db):
        status, data, _ = _request(url, "GET", path)
        assert status != 200 and not _leaks(data, db), (path, status, data[:100])
    # a predict call without a session is refused too
    status, data, _ = _request(url, "POST", "/gradio_api/call/rate_a", json.dumps({"data": ["5", "overall"]}),
                               {"Content-Type": "application/json"})
    assert status in (401, 403, 404), (status, data[:200])


def test_file_routes_never_serve_private_files_even_when_logged_in(app):
    url, _, (db, _, _) = app
    status, cookie = _login(url)
    assert status == 200 and "access-token" in cookie
    ok, data, _ = _request(url, "GET", "/config", headers={"Cookie": cookie})
    assert ok == 200 and b"components" in data                              # the login works
    served = []
    for path in _probe_paths(db):
        status, data, _ = _request(url, "GET", path, headers={"Cookie": cookie})
        if status == 200 or _leaks(data, db):
            served.append((path, status, data[:40]))
    assert served == [], served


def test_repeated_wrong_passwords_are_slowed_down_and_logged(app):
    url, _, (db, _, _) = app
    log_file = Path(db).with_suffix(".log")
    times = []
    for i in range(2):
        t0 = time.perf_counter()
        status, cookie = _login(url, password=f"guess-{i}")
        times.append(time.perf_counter() - t0)
        assert status in (400, 401, 403, 429) and "access-token" not in cookie
    assert times[1] >= 0.8, times                                            # the second one waits longer
    log = log_file.read_text(errors="replace").lower()
    assert log.count("failed login") >= 2 and USER in log
    status, cookie = _login(url)                                             # the right password still works
    assert status == 200 and "access-token" in cookie


def test_a_password_guesser_does_not_freeze_the_app_for_everyone(app):
    url, _, _ = app
    status, cookie = _login(url)
    assert status == 200

    def probe():
        t0 = time.perf_counter()
        st, data, _ = _request(url, "GET", "/gradio_api/login_check", headers={"Cookie": cookie})
        assert st == 200, (st, data[:200])
        return time.perf_counter() - t0

    baseline = min(probe() for _ in range(3))
    import threading
    guesses = threading.Thread(target=lambda: [_login(url, password=f"wrong-{i}") for i in range(3)])
    guesses.start()                     # third wrong password: the server waits 2 s before answering it
    time.sleep(1.8)                     # ... somewhere inside those waits
    during = probe()
    guesses.join()
    assert during < baseline + 0.8, f"a logged-in request took {during:.2f} s while a guesser was slowed down " \
                                    f"(baseline {baseline:.2f} s)"


def test_hostile_text_round_trips_exactly_in_the_file(app):
    """Last in this module: stops the app (it holds the file) and reads what the database holds."""
    from tests.faults.helpers import db_rows
    url, proc, (db, _, rewrite_id) = app
    proc.terminate()
    proc.wait(timeout=60)
    texts = {r[0] for r in db_rows(db, "SELECT text FROM prompts")}
    assert {HOSTILE_PROMPT, *PLAIN} == texts
    assert db_rows(db, "SELECT text FROM completions WHERE id = ?", [rewrite_id]) == [(HOSTILE_REWRITE,)]
    assert db_rows(db, "SELECT text FROM feedback WHERE kind = 'critique'") == [(HOSTILE_CRITIQUE,)]
    assert db_rows(db, "SELECT count(*) FROM prompts WHERE text = ?", [NUL_PROMPT]) == [(1,)]
