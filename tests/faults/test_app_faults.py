"""Cases 7 and 9: the real app (`python launch.py --auth-file ... --blind`) on a database full of hostile text,
driven by headless Chromium, and its HTTP routes probed without and with a login.

Hostile text is stored through the Studio API (prompts, completions, critiques, a criterion's rubric, annotator,
adapter and imported file names, a run's samples, notes and error); the app must show it as text in every tab,
table, plot label and hover text (no script runs, no markup renders), never contact another host, and give it
back byte for byte. Blind mode: an annotator's page names no policy and shows no reward score in any tab, while
the owner, logged in as one, keeps the full view."""
import http.client
import json
import re
import time
import urllib.parse
from pathlib import Path

import pytest

from rlhf_studio.components.models import cache_dir
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
POLICY = "secret-policy"            # an adapter's name: an annotator in blind mode must never see it
HOSTILE_ADAPTER = POLICY + "<img src=x onerror=\"window.__xss=10\"><a href=\"javascript:window.__xss=11\">a</a>"
HOSTILE_ANNOTATOR = "<b onmouseover=\"window.__xss=12\">eve</b>"
HOSTILE_RUBRIC = "rubric [r](javascript:window.__xss=13) ![r](http://198.51.100.7/r.png) <img src=x onerror=\"window.__xss=14\">"
HOSTILE_FILE = "<img src=x onerror=window.__xss=15>.jsonl"
HOSTILE_RUN_ERROR = "<script>window.__xss=16</script> [e](javascript:window.__xss=17) ![e](http://198.51.100.7/e.png)"
ANNOTATOR, ANNOTATOR_PASSWORD = "bo", "staple-battery-horse"
BLIND_PAIR_PROMPT = "Say hi"        # typed into Blind compare by the annotator


def _hostile_policy_and_run(s, folder) -> None:
    """An adapter (hostile name) that won a blind vote against the base, a failed PPO run (hostile samples, note
    and error), a rubric, an annotator and an imported file's name, all hostile."""
    st = s.store       # runs and adapters as a PPO job would leave them, without running one
    rid = st.create_run("ppo", config={"steps": 2})
    st.add_run_metrics(rid, 1, {"reward_mean": 0.5, "kl": 0.01})
    st.add_run_samples(rid, 1, [{"prompt": HOSTILE_PROMPT, "response": HOSTILE_REWRITE, "reward": 0.25}])
    st.add_run_note(rid, HOSTILE_CRITIQUE)
    st.set_run_status(rid, "failed", error=HOSTILE_RUN_ERROR)
    aid = st.add_adapter(HOSTILE_ADAPTER, b"w", {}, "base/model", run_id=rid, step=1)
    base = s.generate("A blind prompt", n=1, max_new_tokens=2, seed=0, prompt_source="blind")[0]
    tuned = st.add_completions([{"prompt_id": base.prompt_id, "text": "tuned answer", "adapter_id": aid}])[0]
    s.compare(base.id, tuned, "b")
    s.add_criterion("helpfulness", HOSTILE_RUBRIC)
    s.rate(base.id, 4, criterion="helpfulness", annotator=HOSTILE_ANNOTATOR)
    s.rate(base.id, 3, criterion="helpfulness")
    rated = folder / HOSTILE_FILE
    rated.write_text(json.dumps({"prompt": "rated prompt", "completions": [{"text": "good", "score": 5},
                                                                           {"text": "bad", "score": 1}]}) + "\n")
    s.import_rated(str(rated))


@pytest.fixture(scope="module")
def hostile_db(tmp_path_factory, lm):
    folder = tmp_path_factory.mktemp("hostile")
    path = str(folder / "hostile.duckdb")
    with open_studio(path, lm) as s:
        cs = s.generate(HOSTILE_PROMPT, n=2, max_new_tokens=4, seed=0)
        s.rate(cs[0].id, 5)
        s.thumbs(cs[1].id, up=False, tags=["harmful"])
        out = s.critique(cs[1].id, HOSTILE_CRITIQUE, rewrite=HOSTILE_REWRITE)
        s.rate(cs[0].id, 2, annotator=HOSTILE_ANNOTATOR)       # two annotators on one completion: agreement
        s.compare(cs[0].id, cs[1].id, "a")
        s.add_prompts(PLAIN)
        _hostile_policy_and_run(s, folder)
        s.reward.wait_idle(60)
        s.train_reward_model(tier="fast")         # scores: the Reward tab's likes and histogram, the cards
    return path, cs[0].prompt_id, out["rewrite_completion_id"]


@pytest.fixture(scope="module")
def app(hostile_db):
    users = Path(hostile_db[0]).with_name("users.json")
    users.write_text(json.dumps({"users": [{"username": USER, "password": PASSWORD, "role": "owner"},
                                           {"username": ANNOTATOR, "password": ANNOTATOR_PASSWORD,
                                            "role": "annotator"}]}))
    with running_app(hostile_db[0], "--auth-file", str(users), "--blind") as (url, proc):
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


def _log_in(page, url, user, password):
    from playwright.sync_api import expect
    page.goto(url)
    page.get_by_label("username").fill(user)          # the login page
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()
    expect(page.locator("#generate-btn")).to_be_visible(timeout=60_000)
    page.wait_for_function(    # the page-load events done (tests/browser.py open_app)
        "() => ![...document.querySelectorAll('[data-testid=status-tracker]')]"
        ".some(t => !t.classList.contains('hide') && t.offsetParent !== null)", timeout=120_000)


def _open_tab(page, name, ready):
    from playwright.sync_api import expect
    page.get_by_role("tab", name=name, exact=True).click()
    expect(page.locator(ready)).not_to_be_empty(timeout=60_000)
    page.wait_for_timeout(800)                      # a tab's select event and its timer's first tick


def _hover_plots(page, selector) -> str:
    """Move the mouse over every bar and marker (and the middle of each plot area, for heatmaps) of the plots under
    `selector`; the hover labels' text seen."""
    seen = []
    targets = ", ".join(f"{sel.strip()} {part}" for sel in selector.split(",") for part in (".point", ".nsewdrag"))
    for box in [b.bounding_box() for b in page.locator(targets).all()[:120]]:
        if box and box["width"] * box["height"] > 0:
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            seen.append(page.evaluate("() => [...document.querySelectorAll('.hoverlayer')]"
                                      ".map(h => h.textContent).join(' ')"))
    page.mouse.move(0, 0)
    return " ".join(seen)


def _text(page, selector) -> str:
    return " ".join(page.locator(selector).all_text_contents())


def test_hostile_text_is_shown_as_text_everywhere(app):
    """Every tab as the owner: the hostile markup is on screen as literal text (rendered markup would not show its
    tag) and nothing was injected, also in plot labels and hover text."""
    from playwright.sync_api import expect
    url, proc, (db, prompt_id, rewrite_id) = app
    with browser() as b:
        page = b.new_page(viewport={"width": 1500, "height": 1300})
        blocked = _guard_network(page, url)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
        _log_in(page, url, USER, PASSWORD)
        _no_injection(page, "after login")

        # prompt library -> "Load its completions"; the hostile rubric of a criterion
        page.locator("#library input").click()
        page.get_by_role("option").filter(has_text="window.__xss=1").first.click()
        page.click("#load-prompt-btn")
        expect(page.locator("#status")).to_contain_text(f"completions of prompt #{prompt_id} loaded", timeout=60_000)
        assert page.locator("#prompt textarea").input_value() == HOSTILE_PROMPT       # exact, in the UI too
        shown = [page.locator(f"#comp-{i} textarea").input_value() for i in range(3)]
        assert HOSTILE_REWRITE in shown
        expect(page.locator("#rubric")).to_contain_text(HOSTILE_RUBRIC)
        expect(page.locator("#score-0")).to_contain_text("reward (fast v")   # the owner sees scores in blind mode
        _no_injection(page, "Generate & Rate with the hostile prompt loaded")

        _open_tab(page, "Reward model", "#reward-status")
        expect(page.locator("#reward-liked-most, #reward-liked-least").first).to_be_visible()
        assert "<iframe src=" in _text(page, "#reward-liked-most") + _text(page, "#reward-liked-least")
        _hover_plots(page, "#reward-hist")
        _no_injection(page, "Reward model")

        _open_tab(page, "Train (PPO)", "#ppo-status")
        expect(page.locator("#ppo-status")).to_contain_text(HOSTILE_RUN_ERROR, timeout=30_000)
        expect(page.locator("#ppo-status")).to_contain_text("Note: <b onmouseover=")      # the run's note
        expect(page.locator("#ppo-samples")).to_contain_text("<iframe src=")
        expect(page.locator("#ppo-adapters")).to_contain_text(HOSTILE_ADAPTER)
        _hover_plots(page, "#ppo-curves")
        _no_injection(page, "Train (PPO)")

        _open_tab(page, "Blind compare", "#blind-winrates")
        expect(page.locator("#blind-winrates")).to_contain_text(HOSTILE_ADAPTER)     # the owner sees policies
        _no_injection(page, "Blind compare")

        # History tab: labels, completions, prompts tables
        page.get_by_role("tab", name="History").click()
        page.click("#history-refresh")
        expect(page.locator("#history-summary")).to_contain_text("labels shown", timeout=60_000)
        shown_as_text = {"Completions": "<iframe src=", "Prompts": "<svg onload=", "Labels": "<b onmouseover="}
        for sub, literal in shown_as_text.items():
            page.get_by_role("tab", name=sub, exact=True).click()
            # the markup is on screen as literal text (rendered markup would not show its tag)
            expect(page.locator(f"#history-{sub.lower()}")).to_contain_text(literal, timeout=30_000)
            if sub == "Completions":
                expect(page.locator("#history-completions")).to_contain_text("import:" + HOSTILE_FILE)
                expect(page.locator("#history-completions")).to_contain_text("adapter-")
            _no_injection(page, f"History / {sub}")

        # Dashboard tab: axis labels, legends and hover text hold prompts, annotators, policies as text
        _open_tab(page, "Dashboard", "#dash-summary")
        expect(page.locator("#dash-coverage")).to_contain_text("<script>window.__xss=1</script>", timeout=30_000)
        expect(page.locator("#dash-leaderboard")).to_contain_text(HOSTILE_ADAPTER)
        expect(page.locator("#dash-agreement")).to_contain_text(HOSTILE_ANNOTATOR)
        expect(page.locator("#dash-over-time")).to_contain_text(HOSTILE_ANNOTATOR)
        hovered = _hover_plots(page, "#dash-over-time, #dash-stars, #dash-coverage, #dash-agreement, "
                                     "#dash-leaderboard")
        assert "<script>window.__xss=1</script>" in hovered, hovered[:2000]        # a prompt in a hover label
        _no_injection(page, "Dashboard, plots hovered")
        assert not errors, errors
    beacons = [u for u in blocked if BEACON_HOST in u]
    assert beacons == [], f"the page tried to load {beacons} (blocked by the test, never sent)"
    assert blocked == [], f"the page tried to contact other hosts (blocked by the test, never sent): {blocked}"


def _nothing_revealed(page, where):
    """No policy name or reward score anywhere in the page (hidden parts included), and no policy or score on
    screen; the owner's walk above sees each of them (the same checks fail there)."""
    everything = page.evaluate("() => document.documentElement.textContent")
    on_screen = page.evaluate("() => document.body.innerText")
    found = [w for w in (POLICY, "reward (fast", "reward (deep") if w in everything]
    found += re.findall(r"adapter-\d+", everything)
    found += [w for w in ("policy", "liked most", "liked least", "reward scores", "reward model vs", "win rate")
              if w in on_screen.lower()]
    assert found == [], (where, found)


def test_blind_mode_shows_an_annotator_no_policy_and_no_score(app):
    """--blind with --auth-file: an annotator walks every tab, loads completions, labels, asks for a suggestion
    and votes in Blind compare, and never sees which policy wrote what nor a reward-model score."""
    from playwright.sync_api import expect
    url, _, (db, prompt_id, _) = app
    with browser() as b:
        page = b.new_page(viewport={"width": 1500, "height": 1300})
        _log_in(page, url, ANNOTATOR, ANNOTATOR_PASSWORD)
        expect(page.get_by_role("tab", name="Train (PPO)")).to_have_count(0)
        page.locator("#library input").click()
        page.get_by_role("option").filter(has_text="blind prompt").first.click()
        page.click("#load-prompt-btn")
        expect(page.locator("#status")).to_contain_text("completions of prompt", timeout=60_000)
        page.locator("#stars-0 input[value='4']").click()
        expect(page.locator("#status")).to_contain_text("4 stars for A", timeout=60_000)
        expect(page.locator("#score-0")).to_contain_text("hidden (blind mode)")
        page.click("#suggest-btn")
        expect(page.locator("#suggestion")).not_to_be_empty(timeout=60_000)
        _nothing_revealed(page, "Generate & Rate")
        for name, ready in (("Reward model", "#reward-status"), ("History", "#history-summary"),
                            ("Dashboard", "#dash-summary")):
            _open_tab(page, name, ready)
            _hover_plots(page, "[id^=dash-], [id^=reward-]")
            _nothing_revealed(page, name)
        page.get_by_role("tab", name="History").click()
        page.get_by_role("tab", name="Completions", exact=True).click()
        expect(page.locator("#history-completions")).to_contain_text("tuned answer", timeout=30_000)
        _nothing_revealed(page, "History / Completions")
        page.get_by_role("tab", name="Blind compare").click()
        page.locator("#blind-prompt textarea").fill(BLIND_PAIR_PROMPT)
        page.locator("#blind-new-tokens input").fill("2")
        page.click("#blind-generate")
        expect(page.locator("#blind-reveal")).not_to_be_empty(timeout=120_000)
        if page.locator("#blind-left textarea").input_value():
            page.click("#blind-vote-a")
            expect(page.locator("#blind-reveal")).to_contain_text("vote saved", timeout=60_000)
        _nothing_revealed(page, "Blind compare")


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
    assert {HOSTILE_PROMPT, *PLAIN, "A blind prompt", "rated prompt"} == texts - {BLIND_PAIR_PROMPT}
    assert db_rows(db, "SELECT name FROM adapters") == [(HOSTILE_ADAPTER,)]
    assert db_rows(db, "SELECT description FROM criteria WHERE name = 'helpfulness'") == [(HOSTILE_RUBRIC,)]
    assert db_rows(db, "SELECT text FROM completions WHERE id = ?", [rewrite_id]) == [(HOSTILE_REWRITE,)]
    assert db_rows(db, "SELECT text FROM feedback WHERE kind = 'critique'") == [(HOSTILE_CRITIQUE,)]
    assert db_rows(db, "SELECT count(*) FROM prompts WHERE text = ?", [NUL_PROMPT]) == [(1,)]
