"""Load driver shared by tests/faults/test_load.py and bench/bench_load.py: a seeded database, N browser
sessions (one Chromium, one context each) labelling in the Generate & Rate tab, and an observer page on the
Reward tab that starts and watches deep reward-model training.

Every label's latency is measured inside its page: from the click (a capturing listener) to the moment the
status line shows the confirmation "... saved: ... (label #ID)" (a MutationObserver), both on the page's own
performance.now() clock, so neither Playwright's polling nor the Python event loop is counted."""
from __future__ import annotations

import asyncio
import json
import math
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field

from tests.browser import CHROMIUM, CHROMIUM_ARGS

LETTERS = "ABCDEFGH"
SLOTS = 4                     # completions per prompt (cards A-D)
WINNERS = ("a", "b", "tie", "both_bad")
# Distinct, none a substring of another (the library dropdown is searched by text).
PROMPTS = [
    "Describe a rainy afternoon in one sentence.",
    "Give one tip for learning to juggle.",
    "What is a good name for a grey cat?",
    "Explain what a compass does, briefly.",
    "Write a short greeting for a birthday card.",
    "Suggest a snack for a long hike.",
    "Why do leaves change colour in autumn?",
    "Name a board game for four players.",
    "How should I water a cactus?",
    "Give a one-line summary of the tortoise and the hare.",
    "What makes bread rise?",
    "Suggest a title for a mystery novel.",
    "How do bees make honey?",
    "Recommend a way to remember a phone number.",
    "What is the tallest animal on land?",
    "Write a polite way to decline an invitation.",
]

# Installed before any page script runs: click times and every toast (Gradio's error/busy pop-ups).
INIT_JS = """
(() => {
  window.__load = {clickT: null, events: [], toasts: []};
  document.addEventListener('click', () => { window.__load.clickT = performance.now(); }, true);
  const seen = new WeakSet();
  setInterval(() => {
    document.querySelectorAll('[data-testid="toast-body"]').forEach(t => {
      if (!seen.has(t)) { seen.add(t); window.__load.toasts.push((t.innerText || '').trim()); }
    });
  }, 200);
})();
"""

# Once the Generate & Rate tab is on screen: every change of the status line, with its time and the last click.
WATCH_STATUS_JS = """
() => {
  const el = document.querySelector('#status');
  let last = el.innerText;
  new MutationObserver(() => {
    const t = el.innerText;
    if (t !== last) {
      last = t;
      window.__load.events.push({t: performance.now(), click: window.__load.clickT, text: t});
    }
  }).observe(el, {subtree: true, childList: true, characterData: true});
}
"""

# The first status change after index n that confirms a label newer than `after` (or shows an error).
CONFIRMED_JS = """
([n, after, expect]) => {
  const ev = window.__load.events;
  for (let k = n; k < ev.length; k++) {
    const text = ev[k].text;
    if (text.includes('Error:')) return {id: null, lat: ev[k].t - ev[k].click, text};
    const m = [...text.matchAll(/\\(label #(\\d+)\\)/g)].pop();
    if (m && Number(m[1]) > after && text.includes(expect)) return {id: Number(m[1]), lat: ev[k].t - ev[k].click, text};
  }
  return null;
}
"""

STATUS_JS = """
([n, expect]) => {
  const ev = window.__load.events;
  for (let k = n; k < ev.length; k++) {
    if (ev[k].text.includes('Error:') || ev[k].text.includes(expect)) return ev[k].text;
  }
  return null;
}
"""

TRAINING_TEXT = "deep tier training in the background"


# --------------------------------------------------------------------------------------------- seeding
ANSWERS = [
    "Grey clouds hang low while rain taps on the window and the street shines.",
    "Start with two balls and throw them in a steady arc from hand to hand.",
    "Ash, Pebble or Smoke all suit a grey cat.",
    "A compass has a magnetised needle that turns to point north.",
    "Happy birthday! Wishing you a year full of good surprises.",
    "Trail mix: nuts, raisins and a little chocolate give lasting energy.",
    "Trees stop making chlorophyll, so the yellow and red pigments show.",
    "Ticket to Ride plays well with four people.",
    "Water a cactus deeply but rarely, and let the soil dry out in between.",
    "Slow and steady wins: the careless hare loses to the patient tortoise.",
    "Yeast eats sugar and releases carbon dioxide, which makes the dough rise.",
    "The Silent Lighthouse",
    "Bees collect nectar, add enzymes and fan it with their wings until it thickens.",
    "Split it into chunks of three or four digits and repeat them aloud.",
    "The giraffe, at up to about five and a half metres.",
    "Thank you so much for inviting me; sadly I cannot make it this time.",
]
STYLES = ["{a}", "Sure! {a} I hope this helps.", "Hmm, let me think. {a} That is my best answer.",
          "I am not sure, but maybe: {a}"]


def seed_database(path: str, lm, n_prompts: int = 16) -> dict:
    """Prompts with 4 completions each (fixed texts: the sessions load completions instead of generating) and
    distinct star ratings (6 preference pairs a prompt), so that the deep tier has pairs to train on.
    Returns {"prompts": {prompt_id: (text, [completion ids in card order])}, "last_label_id": int}."""
    from rlhf_studio import Studio
    s = Studio(path, model=lm)
    s.reward.settings.deep_every = 0
    prompts, all_ids = {}, []
    try:
        for k, text in enumerate(PROMPTS[:n_prompts]):
            pid = s.store.add_prompt(text)
            ids = s.store.add_completions([dict(prompt_id=pid, text=st.format(a=ANSWERS[k]), source="model",
                                                model_id=s.model_id, finish_reason="eos") for st in STYLES])
            prompts[pid] = (text, sorted(ids))
            all_ids += ids
        s.reward.completions_added(all_ids)           # features, as after a generation
        for k, (pid, (_, ids)) in enumerate(prompts.items()):
            for j, cid in enumerate(ids):
                s.rate(cid, (j + k) % 5 + 1)
        s.reward.wait_idle(120)
    finally:
        s.close()
    from tests.faults.helpers import db_rows
    last = int(db_rows(path, "SELECT max(id) FROM feedback")[0][0])
    return {"prompts": prompts, "last_label_id": last}


# ------------------------------------------------------------------------------------------- sessions
@dataclass
class Label:
    id: int
    kind: str                 # stars | thumbs | pairwise
    prompt_id: int
    slots: tuple              # (i,) or (a, b) for pairwise
    value: object             # stars int, up bool, winner str
    latency_ms: float
    text: str


@dataclass
class Session:
    index: int
    labels: list[Label] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)     # errors shown, missing confirmations, wrong text
    toasts: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    loads: int = 0


def _short(text: str, n: int = 70) -> str:          # as the library dropdown shows a prompt
    t = " ".join(str(text).split())
    return t if len(t) <= n else t[: n - 1] + "…"


async def _events(page) -> int:
    return await page.evaluate("window.__load.events.length")


async def _wait_status(page, n: int, expect: str, timeout_ms: float) -> str:
    h = await page.wait_for_function(STATUS_JS, arg=[n, expect], timeout=timeout_ms, polling=50)
    return await h.json_value()


async def _pick(page, elem: str, option: str) -> None:
    from playwright.async_api import expect
    await page.locator(f"#{elem} input").click()
    await page.get_by_role("option").filter(has_text=option).first.click()
    await expect(page.locator(f"#{elem} input")).to_have_value(option, timeout=30_000)


class Labeller:
    """One annotator: loads a prompt's completions, then stars / thumbs / pairwise choices in random order,
    each one waited for (as a person waits for the confirmation) before the next."""

    def __init__(self, page, index: int, prompts: dict, rng: random.Random, label_timeout_s: float = 60):
        self.page, self.s = page, Session(index)
        self.prompts = prompts
        self.rng = rng
        self.timeout_ms = label_timeout_s * 1000
        self.prompt_id: int | None = None
        self.stars = [None] * SLOTS
        self.pair = ("A", "B")
        self.winner = None
        self.last_id = 0

    async def load(self, prompt_id: int) -> None:
        text, _ = self.prompts[prompt_id]
        await _pick(self.page, "library", _short(text))
        n = await _events(self.page)
        await self.page.click("#load-prompt-btn")
        shown = await _wait_status(self.page, n, f"completions of prompt #{prompt_id} loaded", self.timeout_ms)
        if "Error:" in shown:
            self.s.problems.append(f"loading prompt #{prompt_id}: {shown}")
        # the cards show this annotator's current stars again: clicking the star already shown sends nothing
        shown_stars = await self.page.evaluate(
            "(n) => [...Array(n).keys()].map(i => { const r = document.querySelector(`#stars-${i} input:checked`);"
            " return r ? parseInt(r.value) : null; })", SLOTS)
        self.prompt_id, self.stars, self.pair, self.winner = prompt_id, shown_stars, ("A", "B"), None
        self.s.loads += 1

    async def _confirm(self, n: int, expect: str, kind: str, slots: tuple, value) -> None:
        try:
            h = await self.page.wait_for_function(CONFIRMED_JS, arg=[n, self.last_id, expect],
                                                  timeout=self.timeout_ms, polling=50)
            got = await h.json_value()
        except Exception as e:          # no confirmation in time: a hang, as far as the annotator can tell
            self.s.problems.append(f"{kind} {expect!r}: no confirmation ({type(e).__name__})")
            return
        if got["id"] is None:
            self.s.problems.append(f"{kind} {expect!r}: {got['text']}")
            return
        self.last_id = got["id"]
        self.s.labels.append(Label(got["id"], kind, self.prompt_id, slots, value, float(got["lat"]), got["text"]))

    async def one_label(self) -> None:
        page, rng = self.page, self.rng
        r = rng.random()
        if r < 0.5:                                   # stars: a value other than the one shown (else no event)
            i = rng.randrange(SLOTS)
            v = rng.choice([x for x in range(1, 6) if x != self.stars[i]])
            n = await _events(page)
            await page.locator(f"#stars-{i} input[value='{v}']").click()
            self.stars[i] = v
            await self._confirm(n, f"rating saved: {v} star{'s' if v != 1 else ''} for {LETTERS[i]}", "stars", (i,), v)
        elif r < 0.75:                                # thumbs up or down
            i, up = rng.randrange(SLOTS), rng.random() < 0.5
            n = await _events(page)
            await page.click(f"#{'up' if up else 'down'}-{i}")
            await self._confirm(n, f"thumbs saved: {'up' if up else 'down'} for {LETTERS[i]}", "thumbs", (i,), up)
        else:                                         # pairwise: maybe another pair, a winner, "Save choice"
            if rng.random() < 0.5:
                a, b = rng.sample(range(SLOTS), 2)
                la, lb = LETTERS[a], LETTERS[b]
                if self.pair[0] != la:
                    await _pick(page, "pair-left", la)
                if self.pair[1] != lb:
                    await _pick(page, "pair-right", lb)
                self.pair = (la, lb)
            w = rng.choice(WINNERS)
            if w != self.winner:
                await page.locator(f"#winner input[value='{w}']").click()
                self.winner = w
            n = await _events(page)
            await page.click("#compare-btn")
            la, lb = self.pair
            await self._confirm(n, f"choice saved: {la} vs {lb}: {w}", "pairwise",
                                (LETTERS.index(la), LETTERS.index(lb)), w)

    async def run(self, until: float, relabel_every: int = 12, think_s: tuple = (0.1, 0.4)) -> Session:
        ids = list(self.prompts)
        await self.load(ids[self.s.index % len(ids)])
        done_here = 0
        while time.monotonic() < until and not self.s.problems:
            if done_here >= relabel_every:
                await self.load(self.rng.choice([p for p in ids if p != self.prompt_id]))
                done_here = 0
            await self.one_label()
            done_here += 1
            await asyncio.sleep(self.rng.uniform(*think_s))
        return self.s


async def open_page(browser, url: str, viewport=(1500, 1300)):
    ctx = await browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    await ctx.add_init_script(INIT_JS)
    page = await ctx.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(url)
    from playwright.async_api import expect
    await expect(page.locator("#generate-btn")).to_be_visible(timeout=120_000)
    await expect(page.locator("#library input")).to_be_visible(timeout=60_000)
    await page.evaluate(WATCH_STATUS_JS)
    return ctx, page, errors


class Observer:
    """A page on the Reward tab: starts deep training with the button, samples the tab's status line."""

    def __init__(self, page):
        self.page = page
        self.samples: list[tuple[float, bool]] = []

    async def open_tab(self) -> None:
        from playwright.async_api import expect
        await self.page.get_by_role("tab", name="Reward model").click()
        await expect(self.page.locator("#train-deep-btn")).to_be_visible(timeout=60_000)

    async def set_every(self, k: int) -> None:
        from playwright.async_api import expect
        box = self.page.locator("#deep-every input")
        await box.fill(str(k))
        await box.press("Enter")
        await expect(self.page.locator("#reward-action")).to_contain_text(f"every {k} new pairs", timeout=60_000)

    async def start_training(self, timeout_s: float = 90) -> None:
        from playwright.async_api import expect
        await self.page.click("#train-deep-btn")
        await expect(self.page.locator("#reward-action")).to_contain_text("deep tier training started",
                                                                          timeout=timeout_s * 1000)
        # the status line refreshes every 3 s (gr.Timer)
        await expect(self.page.locator("#reward-status")).to_contain_text(TRAINING_TEXT, timeout=timeout_s * 1000)

    async def training_now(self) -> bool:
        return TRAINING_TEXT in (await self.page.locator("#reward-status").inner_text())

    async def sample(self, until: float, every_s: float = 2.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() < until:
            self.samples.append((time.monotonic() - t0, await self.training_now()))
            await asyncio.sleep(every_s)
        self.samples.append((time.monotonic() - t0, await self.training_now()))


async def label_for(url: str, prompts: dict, n_sessions: int = 4, seconds: float = 60, train: bool = True,
                    seed: int = 0, phases: tuple | None = None) -> dict:
    """Open n_sessions labelling pages and an observer page; for each phase (train: bool, seconds), optionally
    start deep training, then label for `seconds`. Returns {"phases": [{"train", "sessions", "samples"}]}."""
    from playwright.async_api import async_playwright
    phases = phases or ((train, seconds),)
    out = {"phases": []}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            opened = await asyncio.gather(*[open_page(browser, url) for _ in range(n_sessions + 1)])
            (_, obs_page, obs_errors), labellers_pages = opened[0], opened[1:]
            observer = Observer(obs_page)
            await observer.open_tab()
            zeroed = False
            for k, (with_training, secs) in enumerate(phases):
                if with_training:
                    if zeroed:          # the button takes "every K" from the box: automatic updates on again
                        await observer.set_every(16)
                    if not await observer.training_now():
                        await observer.start_training()
                else:
                    await observer.set_every(0)
                    zeroed = True
                    while await observer.training_now():           # let a running update finish first
                        await asyncio.sleep(2)
                labellers = [Labeller(pg, i, prompts, random.Random(seed * 1000 + k * 100 + i))
                             for i, (_, pg, _) in enumerate(labellers_pages)]
                observer.samples = []
                until = time.monotonic() + secs
                sessions = await asyncio.gather(*[lb.run(until) for lb in labellers], observer.sample(until))
                sessions = sessions[:-1]
                for s, (_, pg, errs) in zip(sessions, labellers_pages):
                    s.toasts = await pg.evaluate("window.__load.toasts")
                    s.page_errors = list(errs)
                out["phases"].append({"train": with_training, "seconds": secs, "sessions": sessions,
                                      "samples": list(observer.samples)})
            out["observer_toasts"] = await obs_page.evaluate("window.__load.toasts")
            out["observer_errors"] = list(obs_errors)
        finally:
            await browser.close()
    return out


def run_label_load(url: str, prompts: dict, **kw) -> dict:
    return asyncio.run(label_for(url, prompts, **kw))


# ------------------------------------------------------------------------------------------- results
def percentile(values, q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of a non-empty list; None for an empty one."""
    v = sorted(values)
    if not v:
        return None
    return float(v[max(0, math.ceil(q / 100 * len(v)) - 1)])


def summary(sessions) -> dict:
    lat = [lb.latency_ms for s in sessions for lb in s.labels]
    kinds: dict[str, int] = {}
    for s in sessions:
        for lb in s.labels:
            kinds[lb.kind] = kinds.get(lb.kind, 0) + 1
    return {"sessions": len(sessions), "labels": len(lat), "by_kind": kinds,
            "per_session": [len(s.labels) for s in sessions],
            "median_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90), "p99_ms": percentile(lat, 99),
            "max_ms": max(lat) if lat else None}


def stop_gracefully(proc: subprocess.Popen, timeout: float = 90) -> int | None:
    """Ctrl+C, as a user stops the app: it stops the deep update after its current step and closes the file."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
    return proc.returncode


def check_db(db: str, prompts: dict, last_seed_label: int, sessions) -> list[str]:
    """Every confirmed label is in the file as confirmed; nothing else was added. Returns the problems."""
    from tests.faults.helpers import db_rows
    rows = db_rows(db, "SELECT id, kind, completion_id, other_completion_id, stars, up, winner, session_id "
                       "FROM feedback WHERE id > ? ORDER BY id", [last_seed_label])
    by_id = {r[0]: r for r in rows}
    problems = []
    confirmed = [lb for s in sessions for lb in s.labels]
    ids = [lb.id for lb in confirmed]
    if len(set(ids)) != len(ids):
        problems.append(f"a label id was confirmed twice: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    missing = sorted(set(ids) - set(by_id))
    extra = sorted(set(by_id) - set(ids))
    if missing:
        problems.append(f"{len(missing)} confirmed labels are not in the database: {missing[:20]}")
    if extra:
        problems.append(f"{len(extra)} labels in the database were never confirmed: {extra[:20]}")
    session_of = {}
    for s in sessions:
        for lb in s.labels:
            r = by_id.get(lb.id)
            if r is None:
                continue
            _, kind, cid, other, stars, up, winner, sess = r
            cards = prompts[lb.prompt_id][1]
            want = {"stars": ("stars", cards[lb.slots[0]], None, lb.value, None, None),
                    "thumbs": ("thumbs", cards[lb.slots[0]], None, None, lb.value, None),
                    "pairwise": ("pairwise", cards[lb.slots[0]], cards[lb.slots[1]] if len(lb.slots) > 1 else None,
                                 None, None, lb.value)}[lb.kind]
            if (kind, cid, other, stars, up, winner) != want:
                problems.append(f"label #{lb.id} of session {s.index}: stored {(kind, cid, other, stars, up, winner)}, "
                                f"confirmed {want}")
            session_of.setdefault(s.index, set()).add(sess)
    for i, ss in session_of.items():
        if len(ss) != 1:
            problems.append(f"session {i}'s labels carry {len(ss)} session ids: {ss}")
    all_sess = [next(iter(ss)) for ss in session_of.values() if len(ss) == 1]
    if len(set(all_sess)) != len(all_sess):
        problems.append("two browser sessions were stored under one session id")
    return problems


def write_json(path, data) -> None:
    from pathlib import Path
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, default=str))
