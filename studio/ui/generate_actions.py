"""The Generate & Rate tab's handlers: functions of the studio, plain values (ids, letters, text) and the caller's
request, returning the values and updates of the tab's outputs. generate.py lays the tab out and wires them."""
from __future__ import annotations

import hashlib
import queue
import threading
import uuid

import gradio as gr

from rlhf_studio.components.generation import MAX_N
from ..auth import require_owner, role_of
from ..errors import StudioError
from .common import (ERROR_PREFIX, LETTERS, annotator_of, blind_view, fail, letters_to_index, md_text, ok,
                     owner_upload, session_of)
from .history import describe_withdrawal

BLIND_SCORE = "<small>reward: hidden (blind mode)</small>"
# slot outputs: each card, its text, its stars and its reason tags, then the A side, the B side and the critique
# target (generate.py lists the components in this order)
SLOTS = 4 * MAX_N + 3
# the outputs of a label: the status line, the cards' scores and the next idempotency key
LABEL_OUTPUTS = 1 + MAX_N + 1

_GEN_STOPS: dict = {}       # session -> the stop event of its running generation


# ------------------------------------------------------------------------------------------ small helpers
def new_label_key() -> str:
    return uuid.uuid4().hex


def label_key_for(key: str | None, *content) -> str | None:
    """The idempotency key of one label: the page's current key plus what the label says, so that two different
    labels sent before the key rotates (rating A, then B) are both kept. No key (an API caller) -> None."""
    if not key:
        return None
    digest = hashlib.sha1(repr(content).encode()).hexdigest()[:16]
    return f"ui:{str(key)[:64]}:{digest}"


def parse_seed(text) -> int | None:
    """The seed field: a whole number, or None where it is empty; StudioError otherwise."""
    text = str(text or "").strip()
    if not text:
        return None
    if not text.lstrip("-").isdigit():
        raise StudioError(f"the seed must be a whole number or empty, got {text!r}")
    return int(text)


def generated_message(ids: list[int], finish_reasons: list[str]) -> str:
    msg = f"{len(ids)} completions saved (ids {ids[0]}–{ids[-1]})"
    return msg + (" — stopped early" if "stop" in finish_reasons else "")


def ranking_order(order: str, n: int) -> list[int]:
    """'B A C' for n=3 shown completions -> [1, 0, 2]; StudioError unless it names each of them exactly once."""
    if not n:
        raise StudioError("generate or load completions first")
    try:
        idx = letters_to_index(order, n)
    except ValueError as e:
        raise StudioError(str(e)) from None
    if sorted(idx) != list(range(n)):
        raise StudioError(f"a ranking must list every completion shown exactly once ({', '.join(LETTERS[:n])})")
    return idx


def rubric_md(names, descriptions) -> str:
    """The criteria as the rubric line shown above the cards (names and questions are text typed by owners)."""
    return "**Rubric** — " + " · ".join(f"**{md_text(n)}**: {md_text(d or '')}" for n, d in zip(names, descriptions))


def suggestion_view(sug: dict, ids: list[int], show_p: bool = True) -> tuple[str | None, str | None, str]:
    """(letter A side, letter B side, message) for Studio.suggest_pair's answer with `ids` on the cards; the
    letters are None where the pair belongs to another prompt. show_p=False: no probability (blind mode)."""
    p = f" (p={sug['p']:.2f})" if show_p else ""
    if ids and sug["a"] in ids and sug["b"] in ids:
        la, lb = LETTERS[ids.index(sug["a"])], LETTERS[ids.index(sug["b"])]
        return la, lb, f"the reward model is least sure about {la} vs {lb}{p}; choose the winner"
    return None, None, (f"least certain pair is in prompt #{sug['prompt_id']}: pick it in the library and press "
                        f"'Load its completions'{p}")


def score_md(score) -> str:
    if score is None:
        return "<small>reward: –</small>"
    mean, std, tier = score
    return f"<small>reward ({tier}): <b>{mean:+.2f}</b> ± {std:.2f}</small>"


def _stars_text(value) -> str:
    return f"{value} star" + ("" if str(value) == "1" else "s")


def _saved(what: str, fid: int, detail: str) -> str:
    return f"{what} saved: {detail} (label #{fid})"


def _short(text: str, n: int = 70) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= n else t[: n - 1] + "…"


def _criterion(crit) -> str:
    return crit or "overall"


# ------------------------------------------------------------------------------------ what the cards show
def scores_for(studio, ids, request: gr.Request = None) -> list:
    """The cards' reward lines: each shown completion's score, none in blind mode (not while labelling)."""
    if blind_view(studio, request):
        return [gr.update(value=BLIND_SCORE)] * MAX_N
    return [gr.update(value=score_md(s)) for s in studio.completion_scores(ids)] + \
           [gr.update(value=score_md(None))] * (MAX_N - len(ids))


def star_values(ids, stars_now: dict) -> list:
    """The cards' star radios: {completion id: stars} shown on the cards holding those ids, the others empty."""
    return [gr.update(value=str(stars_now[ids[i]]) if i < len(ids) and ids[i] in stars_now else None)
            for i in range(MAX_N)]


def slot_updates(ids, texts_now, stars_now=None) -> list:
    """The SLOTS outputs for `ids` on the cards: which cards show, their texts and stars, no tags, and the letters
    the pair and critique choosers offer."""
    k = len(ids)
    letters = list(LETTERS[:max(k, 1)])
    return ([gr.update(visible=i < k) for i in range(MAX_N)]
            + [gr.update(value=texts_now[i] if i < len(texts_now) else "") for i in range(MAX_N)]
            + star_values(ids, stars_now or {})
            + [gr.update(value=[]) for _ in range(MAX_N)]
            + [gr.update(choices=letters, value=letters[0]),
               gr.update(choices=letters, value=letters[min(1, k - 1)] if k else "A"),
               gr.update(choices=letters, value=letters[0])])


def latest_completions(studio, prompt_id) -> tuple[list[int], list[str]]:
    """(ids, texts) of a prompt's MAX_N latest completions, oldest first."""
    df = studio.completions(int(prompt_id)).sort_values("id").tail(MAX_N)
    return [int(x) for x in df["id"]], list(df["text"])


def library_choices(studio):
    """The prompt library dropdown: prompts with the fewest labels first (500 at most)."""
    df = studio.prompts()
    if df is None or len(df) == 0:
        return gr.update(choices=[])
    col = "labels" if "labels" in df.columns else None
    df = df.sort_values([col, "id"] if col else ["id"])
    return gr.update(choices=[(_short(t), int(i)) for i, t in zip(df["id"], df["text"])][:500])


def criteria_update(studio):
    """(criterion dropdown, rubric line) from the studio's criteria."""
    df = studio.criteria()
    names = list(df["name"]) if len(df) else ["overall"]
    return gr.update(choices=names), rubric_md(df["name"], df["description"])


def page_load(studio, request: gr.Request = None):
    """(library, a fresh idempotency key, the starter-prompts button: shown to an owner of an empty library)."""
    empty = len(studio.prompts()) == 0 and role_of(studio, request) == "owner"
    return library_choices(studio), new_label_key(), gr.update(visible=empty)


# -------------------------------------------------------------------------------------------- generating
def _start_generation(studio, session, kwargs: dict):
    """Generate in a thread, cancellable by the Stop button of this session: (streamed texts queue ending with
    None, result dict that gets "cs" or "error")."""
    stop_event = threading.Event()
    updates: queue.Queue = queue.Queue()
    result: dict = {}

    def work():
        try:
            result["cs"] = studio.generate(**kwargs, on_update=updates.put, stop=stop_event.is_set)
        except StudioError as e:
            result["error"] = str(e)
        except Exception as e:  # an unexpected failure must still reach the user
            result["error"] = f"generation failed: {type(e).__name__}: {e}"
        finally:
            if _GEN_STOPS.get(session) is stop_event:     # one entry per generation running, not per page ever
                del _GEN_STOPS[session]
            updates.put(None)

    _GEN_STOPS[session] = stop_event
    threading.Thread(target=work, daemon=True).start()
    return updates, result


def on_generate(studio, prompt_text, n, max_new, temperature, top_p, seed, adapter, request: gr.Request = None):
    """Streams [shown ids, status] + SLOTS + scores: empty cards, the texts as they grow, then the saved ones."""
    n = int(n)
    refused = [gr.skip()] * (SLOTS + MAX_N)
    try:
        seed = parse_seed(seed)
    except StudioError as e:     # refused before anything on screen changes
        yield [gr.skip(), fail(e)] + refused
        return
    base = adapter in (None, "", "base")
    if not base and blind_view(studio, request):
        yield [gr.skip(), fail("blind mode: completions come from the base model here (the policies are "
                               "compared in the Blind compare tab)")] + refused
        return
    updates, result = _start_generation(studio, session_of(request), dict(
        prompt=prompt_text, n=n, max_new_tokens=int(max_new), temperature=float(temperature), top_p=float(top_p),
        seed=seed, adapter=None if base else adapter))
    yield [[], "Generating…"] + slot_updates(list(range(n)), [""] * n) + scores_for(studio, [], request)
    while (item := updates.get()) is not None:
        yield [gr.skip(), "Generating…"] + [gr.skip()] * MAX_N + \
            [gr.update(value=item[i]) if i < len(item) else gr.skip() for i in range(MAX_N)] + \
            [gr.skip()] * (SLOTS - 2 * MAX_N) + [gr.skip()] * MAX_N
    if "error" in result:
        yield [[], fail(result["error"])] + slot_updates([], []) + scores_for(studio, [], request)
        return
    cs = result["cs"]
    ids = [c.id for c in cs]
    yield [ids, ok(generated_message(ids, [c.finish_reason for c in cs]))] + \
        slot_updates(ids, [c.text for c in cs]) + scores_for(studio, ids, request)


def on_stop(request: gr.Request = None) -> str:
    """Stop this session's running generation (the completions so far are kept)."""
    ev = _GEN_STOPS.get(session_of(request))
    if ev is None:
        return ok("nothing is generating in this tab")
    ev.set()
    return "Stopping…"


# ------------------------------------------------------------------------------------------------ labels
def label_result(studio, ids, action, request: gr.Request = None) -> list:
    """[status] + scores + [next idempotency key] of action() (the message of a saved label); the key only
    changes once a label is saved, and an error leaves everything else on screen for a retry."""
    try:
        message = action()
    except StudioError as e:
        return [fail(e)] + [gr.skip()] * (MAX_N + 1)
    except Exception as e:  # e.g. a storage error: show it, the inputs stay on screen for a retry
        return [fail(f"not saved: {e}")] + [gr.skip()] * (MAX_N + 1)
    return [ok(message)] + scores_for(studio, ids, request) + [new_label_key()]


def _who(studio, request) -> dict:
    return dict(annotator=annotator_of(request, studio.annotator), session_id=session_of(request))


def on_star(studio, i: int, ids, value, crit, key, request: gr.Request = None) -> list:
    """Stars `value` for card i (its radio's input event)."""
    if i >= len(ids) or value in (None, ""):
        return [gr.skip()] * LABEL_OUTPUTS
    return label_result(studio, ids, lambda: _saved("rating", studio.rate(
        ids[i], int(value), criterion=_criterion(crit), **_who(studio, request),
        idempotency_key=label_key_for(key, "stars", ids[i], value, crit)), f"{_stars_text(value)} for {LETTERS[i]}"),
        request)


def on_thumb(studio, i: int, up: bool, ids, tag_values, crit, key, request: gr.Request = None) -> list:
    """Thumbs up or down for card i (down with the reason tags ticked on it)."""
    if i >= len(ids):
        return [fail("generate or load completions first")] + [gr.skip()] * (LABEL_OUTPUTS - 1)
    tags_now = None if up else tag_values
    return label_result(studio, ids, lambda: _saved("thumbs", studio.thumbs(
        ids[i], up, tags=tags_now, criterion=_criterion(crit), **_who(studio, request),
        idempotency_key=label_key_for(key, "thumbs", ids[i], up, tags_now, crit)),
        f"{'up' if up else 'down'} for {LETTERS[i]}"), request)


def on_compare(studio, ids, left, right, winner, crit, key, request: gr.Request = None) -> list:
    """The pairwise choice between the cards lettered `left` and `right`."""
    def act():
        if not ids:
            raise StudioError("generate or load completions first")
        if not winner:
            raise StudioError("choose A wins, B wins, tie or both bad")
        a, b = letters_to_index(left, len(ids))[0], letters_to_index(right, len(ids))[0]
        fid = studio.compare(ids[a], ids[b], winner, criterion=_criterion(crit), **_who(studio, request),
                             idempotency_key=label_key_for(key, "pairwise", ids[a], ids[b], winner, crit))
        return _saved("choice", fid, f"{left} vs {right}: {winner}")
    return label_result(studio, ids, act, request)


def on_rank(studio, ids, order, crit, key, request: gr.Request = None) -> list:
    """A ranking of every card shown, typed as letters best first ("B A C")."""
    def act():
        idx = ranking_order(order, len(ids))
        ranked = [ids[i] for i in idx]
        fid = studio.rank(ranked, criterion=_criterion(crit), **_who(studio, request),
                          idempotency_key=label_key_for(key, "ranking", ranked, crit))
        return _saved("ranking", fid, " > ".join(LETTERS[i] for i in idx))
    return label_result(studio, ids, act, request)


def on_critique(studio, ids, target, text, rewrite, crit, key, request: gr.Request = None) -> list:
    """A critique and/or corrected rewrite of card `target`; + [critique box, rewrite box], emptied once saved."""
    def act():
        if not ids:
            raise StudioError("generate or load completions first")
        i = letters_to_index(target, len(ids))[0]
        out = studio.critique(ids[i], text, rewrite=rewrite or None, criterion=_criterion(crit),
                              **_who(studio, request),
                              idempotency_key=label_key_for(key, "critique", ids[i], text, rewrite, crit))
        parts = (["critique"] if "critique_id" in out else []) + (["rewrite"] if "rewrite_id" in out else [])
        return f"{' and '.join(parts)} saved for {target}"
    res = label_result(studio, ids, act, request)
    if not res[0].startswith(ERROR_PREFIX):
        return res + [gr.update(value=""), gr.update(value="")]
    return res + [gr.skip(), gr.skip()]   # keep the unsaved text on screen for a retry


def on_undo(studio, ids, key, request: gr.Request = None) -> list:
    """Withdraw this person's newest label; + the cards' stars: a star shown for it goes back to the label
    current again."""
    done: dict = {}

    def act():
        done.update(studio.undo(annotator=annotator_of(request, studio.annotator),
                                idempotency_key=label_key_for(key, "undo")))
        return describe_withdrawal(done)
    res = label_result(studio, ids, act, request)
    star_updates = [gr.skip()] * MAX_N
    lab = done.get("label")
    if lab and lab["kind"] == "stars" and lab["completion_id"] in ids:
        cid = lab["completion_id"]
        now = studio.my_stars([cid], lab["annotator"], _criterion(lab["criterion"]))
        star_updates[ids.index(cid)] = gr.update(value=str(now[cid]) if cid in now else None)
    return res + star_updates


def on_criterion(studio, ids, crit, request: gr.Request = None) -> list:
    """The stars shown are this person's for the chosen criterion, not the last criterion's."""
    return star_values(ids, studio.my_stars(ids, annotator_of(request, studio.annotator), _criterion(crit)))


def on_suggest(studio, ids, request: gr.Request = None) -> list:
    """[A side, B side, message]: the pair the reward model is least sure about (on the cards, if it is there)."""
    try:
        sug = studio.suggest_pair()
    except StudioError as e:
        return [gr.skip()] * 2 + [fail(e)]
    if not sug:
        return [gr.skip()] * 2 + [fail("nothing to suggest yet: generate completions and add a few labels")]
    la, lb, message = suggestion_view(sug, ids, show_p=not blind_view(studio, request))
    if la is None:
        return [gr.skip(), gr.skip(), ok(message)]
    return [gr.update(value=la), gr.update(value=lb), ok(message)]


# -------------------------------------------------------------------------------- prompts and criteria
def _shown(studio, ids, texts_now, who, crit, request) -> list:
    """SLOTS + scores for `ids` on the cards, with who's stars for the criterion."""
    return slot_updates(ids, texts_now, studio.my_stars(ids, who, _criterion(crit))) + \
        scores_for(studio, ids, request)


def on_next(studio, crit, request: gr.Request = None) -> list:
    """[ids, prompt, status] + SLOTS + scores: the prompt with the fewest labels, with its latest completions (or
    empty cards): the cards must never show another prompt's completions, or labels land on the wrong prompt."""
    who = annotator_of(request, studio.annotator)
    p = studio.next_prompt(annotator=who)
    if p is None:
        return [gr.skip(), gr.skip(), fail("the prompt library is empty: type a prompt or import a file")] + \
            [gr.skip()] * (SLOTS + MAX_N)
    ids, texts_now = latest_completions(studio, p["id"])
    msg = f"prompt #{p['id']} has the fewest labels: " + (
        f"its {len(ids)} latest completions loaded" if ids else "press Generate for completions")
    return [ids, gr.update(value=p["text"]), ok(msg)] + _shown(studio, ids, texts_now, who, crit, request)


def on_load(studio, prompt_id, crit, request: gr.Request = None) -> list:
    """The Load button: [ids, prompt, status] + SLOTS + scores of the library prompt chosen, with its latest
    completions."""
    if prompt_id in (None, ""):
        return [[], gr.skip(), fail("choose a prompt from the library")] + slot_updates([], []) + \
            scores_for(studio, [], request)
    ids, texts_now = latest_completions(studio, prompt_id)
    text = studio.prompts().set_index("id").loc[int(prompt_id), "text"]
    who = annotator_of(request, studio.annotator)
    return [ids, gr.update(value=text), ok(f"{len(ids)} completions of prompt #{prompt_id} loaded")] + \
        _shown(studio, ids, texts_now, who, crit, request)


def on_add_criterion(studio, name, description, request: gr.Request = None) -> list:
    """[status, criterion dropdown, rubric, name box] after adding (or redescribing) a criterion (owners)."""
    try:
        require_owner(studio, request, "add criteria")
        studio.add_criterion(name or "", description or "")
    except StudioError as e:
        return [fail(e), gr.skip(), gr.skip(), gr.skip()]
    names, md = criteria_update(studio)
    return [ok(f"criterion {name.strip()!r} saved: choose it above to label by it"), names, md, gr.update(value="")]


def on_add(studio, text, request: gr.Request = None):
    """(status, prompts box): one prompt per line into the library (owners)."""
    try:
        require_owner(studio, request, "add prompts")
        ids = studio.add_prompts([t for t in (text or "").splitlines() if t.strip()], source="manual")
    except StudioError as e:
        return fail(e), gr.skip()
    if not ids:
        return fail("type at least one prompt"), gr.skip()
    return ok(f"{len(ids)} prompts in the library"), gr.update(value="")


def on_starter(studio, request: gr.Request = None):
    """(status, the button): a fresh library gets the studio's everyday prompts
    (studio/data/starter_prompts.txt), one click."""
    try:
        require_owner(studio, request, "add prompts")
        added = studio.load_starter_prompts()
    except StudioError as e:
        return fail(e), gr.skip()
    return ok(f"{added} starter prompts added: press 'Next prompt'"), gr.update(visible=False)


def on_import_prompts(studio, f, request: gr.Request = None) -> str:
    """A .txt / .jsonl / .csv / .parquet file of prompts into the library (owners)."""
    try:
        n = studio.import_prompts(owner_upload(studio, request, f, "import prompts"))
    except StudioError as e:
        return fail(e)
    return ok(f"{n} prompts imported")
