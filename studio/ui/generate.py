"""Generate & Rate tab: a prompt, N streamed completions side by side, and all six kinds of feedback."""
from __future__ import annotations

import hashlib
import queue
import threading
import uuid

import gradio as gr

from components.generation import MAX_N
from ..auth import require_owner, role_of
from ..errors import StudioError
from .common import (ERROR_PREFIX, LETTERS, annotator_of, blind_view, fail, letters_to_index, md_text, ok,
                     owner_upload, session_of)
from .history import describe_withdrawal

WINNER_CHOICES = [("A wins", "a"), ("B wins", "b"), ("Tie", "tie"), ("Both bad", "both_bad")]


BLIND_SCORE = "<small>reward: hidden (blind mode)</small>"


def _score_md(score) -> str:
    if score is None:
        return "<small>reward: –</small>"
    mean, std, tier = score
    return f"<small>reward ({tier}): <b>{mean:+.2f}</b> ± {std:.2f}</small>"


def build(studio, role: str = "owner"):
    """Lay out the tab; returns nothing (events are wired at the bottom)."""
    ids_state = gr.State([])          # completion ids shown, slot order
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                placeholder="Ask the model something, or press 'Next prompt'")
        with gr.Column(scale=1, min_width=220):
            next_btn = gr.Button("Next prompt (n)", elem_id="next-prompt-btn")
            library = gr.Dropdown(label="Prompt library (fewest labels first)", choices=[], elem_id="library",
                                  allow_custom_value=False)
            load_btn = gr.Button("Load its completions", size="sm", elem_id="load-prompt-btn")
            starter_btn = gr.Button("Load starter prompts", size="sm", visible=False, elem_id="starter-prompts-btn")
    with gr.Accordion("Add prompts to the library", open=False, visible=role == "owner") as prompts_box:
        with gr.Row():
            new_prompts = gr.Textbox(label="One prompt per line", lines=3, elem_id="new-prompts", scale=3)
            add_btn = gr.Button("Add", elem_id="add-prompts-btn")
            prompt_file = gr.File(label="or import .txt / .jsonl / .csv / .parquet", elem_id="prompt-file",
                                  file_types=[".txt", ".jsonl", ".csv", ".parquet"])
            import_btn = gr.Button("Import file", elem_id="import-prompts-btn")
    with gr.Accordion("Criteria annotators judge by", open=False, visible=role == "owner") as criteria_box:
        with gr.Row():
            crit_name = gr.Textbox(label="Name (e.g. helpfulness)", elem_id="new-criterion", max_lines=1)
            crit_desc = gr.Textbox(label="What it asks (shown as the rubric)", elem_id="new-criterion-desc",
                                   max_lines=1, scale=3)
            crit_btn = gr.Button("Add or redescribe", elem_id="add-criterion-btn")
    with gr.Row():
        n = gr.Slider(1, MAX_N, value=4, step=1, label="Completions (n)", elem_id="n")
        max_new = gr.Slider(8, 512, value=64, step=8, label="Max new tokens", elem_id="max-new-tokens")
        temperature = gr.Slider(0, 2, value=0.8, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature")
        top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="Top-p", elem_id="top-p")
        seed = gr.Textbox(value="", label="Seed (empty = random)", elem_id="seed", max_lines=1)
        adapter = gr.Dropdown(label="Policy", choices=["base"], value="base", elem_id="adapter")
    with gr.Row():
        gen_btn = gr.Button("Generate (g)", variant="primary", elem_id="generate-btn")
        stop_btn = gr.Button("Stop", elem_id="stop-btn")
        criterion = gr.Dropdown(label="Criterion", choices=["overall"], value="overall", elem_id="criterion")
        undo_btn = gr.Button("Undo my last label (z)", elem_id="undo-btn")
    rubric = gr.Markdown(elem_id="rubric")
    status = gr.Markdown(elem_id="status")

    cols, texts, scores, stars, ups, downs, tags = [], [], [], [], [], [], []
    with gr.Row(equal_height=False):
        for i in range(MAX_N):
            with gr.Column(visible=i < 4, min_width=220, elem_id=f"card-{i}", elem_classes=["rlhf-card"]) as col:
                texts.append(gr.Textbox(label=LETTERS[i], lines=8, max_lines=20, interactive=False,
                                        elem_id=f"comp-{i}", buttons=["copy"]))
                scores.append(gr.Markdown(_score_md(None), elem_id=f"score-{i}"))
                stars.append(gr.Radio(["1", "2", "3", "4", "5"], label="Stars", elem_id=f"stars-{i}"))
                with gr.Row():
                    ups.append(gr.Button("Thumbs up (u)", size="sm", elem_id=f"up-{i}", min_width=40))
                    downs.append(gr.Button("Thumbs down (d)", size="sm", elem_id=f"down-{i}", min_width=40))
                tags.append(gr.CheckboxGroup(list(studio.reason_tags), label="Thumbs-down reasons",
                                             elem_id=f"tags-{i}"))
            cols.append(col)

    with gr.Row():
        with gr.Column():
            gr.Markdown("**Pairwise choice**")
            with gr.Row():
                left = gr.Dropdown(list(LETTERS[:4]), value="A", label="A side", elem_id="pair-left")
                right = gr.Dropdown(list(LETTERS[:4]), value="B", label="B side", elem_id="pair-right")
            winner = gr.Radio(WINNER_CHOICES, label="Which is better?", elem_id="winner")
            compare_btn = gr.Button("Save choice", elem_id="compare-btn")
            suggest_btn = gr.Button("Suggest what to label next", size="sm", elem_id="suggest-btn")
            suggestion = gr.Markdown(elem_id="suggestion")
        with gr.Column():
            gr.Markdown("**Ranking** (all shown completions, best first)")
            ranking = gr.Textbox(label="Order, e.g. B A D C", elem_id="ranking")
            rank_btn = gr.Button("Save ranking", elem_id="rank-btn")
        with gr.Column():
            gr.Markdown("**Critique and corrected rewrite**")
            target = gr.Dropdown(list(LETTERS[:4]), value="A", label="Completion", elem_id="critique-target")
            critique = gr.Textbox(label="Critique", lines=2, elem_id="critique")
            rewrite = gr.Textbox(label="Corrected rewrite (optional)", lines=3, elem_id="rewrite")
            critique_btn = gr.Button("Save critique", elem_id="critique-btn")
    # A fresh key per page load and after each saved label: a double click or a retried request carries the same
    # key and content, so it is stored once (API callers may pass their own key, or none).
    label_key = gr.Textbox(value="", visible=False, elem_id="label-key", label="Idempotency key")

    # ------------------------------------------------------------------ logic
    def scores_for(ids, request):
        if blind_view(studio, request):     # blind mode: no reward-model scores while labelling
            return [gr.update(value=BLIND_SCORE)] * MAX_N
        return [gr.update(value=_score_md(s)) for s in studio.completion_scores(ids)] + \
               [gr.update(value=_score_md(None))] * (MAX_N - len(ids))

    def my_stars(ids, annotator, crit) -> dict:
        """{completion id: stars} of this person's current star labels on `ids` for the criterion."""
        return studio.my_stars(ids, annotator, crit or "overall")

    def star_values(ids, stars_now):
        return [gr.update(value=str(stars_now[ids[i]]) if i < len(ids) and ids[i] in stars_now else None)
                for i in range(MAX_N)]

    def slot_updates(ids, texts_now, stars_now=None):
        k = len(ids)
        letters = list(LETTERS[:max(k, 1)])
        return ([gr.update(visible=i < k) for i in range(MAX_N)]
                + [gr.update(value=texts_now[i] if i < len(texts_now) else "") for i in range(MAX_N)]
                + star_values(ids, stars_now or {})
                + [gr.update(value=[]) for _ in range(MAX_N)]
                + [gr.update(choices=letters, value=letters[0]), gr.update(choices=letters, value=letters[min(1, k - 1)] if k else "A"),
                   gr.update(choices=letters, value=letters[0])])

    slot_outputs = cols + texts + stars + tags + [left, right, target]

    def on_generate(prompt_text, n_, max_new_, temp_, top_p_, seed_, adapter_, request: gr.Request):
        n_ = int(n_)
        try:
            seed_ = parse_seed(seed_)
        except StudioError as e:     # refused before anything on screen changes
            yield [gr.skip(), fail(e)] + [gr.skip()] * (len(slot_outputs) + MAX_N)
            return
        if adapter_ not in (None, "", "base") and blind_view(studio, request):
            yield [gr.skip(), fail("blind mode: completions come from the base model here (the policies are "
                                   "compared in the Blind compare tab)")] + [gr.skip()] * (len(slot_outputs) + MAX_N)
            return
        stop_event = threading.Event()
        updates: queue.Queue = queue.Queue()
        result: dict = {}

        def work():
            try:
                result["cs"] = studio.generate(
                    prompt_text, n=n_, max_new_tokens=int(max_new_), temperature=float(temp_), top_p=float(top_p_),
                    seed=seed_,
                    adapter=None if adapter_ in (None, "", "base") else adapter_,
                    on_update=updates.put, stop=stop_event.is_set)
            except StudioError as e:
                result["error"] = str(e)
            except Exception as e:  # an unexpected failure must still reach the user
                result["error"] = f"generation failed: {type(e).__name__}: {e}"
            finally:
                if _GEN_STOPS.get(session) is stop_event:     # one entry per generation running, not per page ever
                    del _GEN_STOPS[session]
                updates.put(None)

        session = session_of(request)
        _GEN_STOPS[session] = stop_event
        threading.Thread(target=work, daemon=True).start()
        blank = [""] * n_
        yield [[], "Generating…"] + slot_updates(list(range(n_)), blank) + scores_for([], request)
        while True:
            item = updates.get()
            if item is None:
                break
            yield [gr.skip(), "Generating…"] + [gr.skip()] * MAX_N + \
                [gr.update(value=item[i]) if i < len(item) else gr.skip() for i in range(MAX_N)] + \
                [gr.skip()] * (2 * MAX_N + 3) + [gr.skip()] * MAX_N
        if "error" in result:
            yield [[], fail(result["error"])] + slot_updates([], []) + scores_for([], request)
            return
        cs = result["cs"]
        ids = [c.id for c in cs]
        yield [ids, ok(generated_message(ids, [c.finish_reason for c in cs]))] + slot_updates(ids, [c.text for c in cs]) + scores_for(ids, request)

    def on_stop(request: gr.Request):
        ev = _GEN_STOPS.get(session_of(request))
        if ev is None:
            return ok("nothing is generating in this tab")
        ev.set()
        return "Stopping…"

    def label_result(ids, action, request):
        """[status] + scores + [next idempotency key]; the key only changes once a label is saved."""
        try:
            message = action()
        except StudioError as e:
            return [fail(e)] + [gr.skip()] * MAX_N + [gr.skip()]
        except Exception as e:  # e.g. a storage error: show it, the inputs stay on screen for a retry
            return [fail(f"not saved: {e}")] + [gr.skip()] * MAX_N + [gr.skip()]
        return [ok(message)] + scores_for(ids, request) + [new_label_key()]

    def on_star(i):
        def handler(ids, value, crit, key, request: gr.Request):
            if i >= len(ids) or value in (None, ""):
                return [gr.skip()] * (MAX_N + 2)
            return label_result(ids, lambda: _saved("rating", studio.rate(
                ids[i], int(value), criterion=crit or "overall", annotator=annotator_of(request, studio.annotator),
                session_id=session_of(request), idempotency_key=label_key_for(key, "stars", ids[i], value, crit)),
                f"{_stars_text(value)} for {LETTERS[i]}"), request)
        return handler

    def on_thumb(i, up):
        def handler(ids, tag_values, crit, key, request: gr.Request):
            if i >= len(ids):
                return [fail("generate or load completions first")] + [gr.skip()] * (MAX_N + 1)
            tags_now = None if up else tag_values
            return label_result(ids, lambda: _saved("thumbs", studio.thumbs(
                ids[i], up, tags=tags_now, criterion=crit or "overall",
                annotator=annotator_of(request, studio.annotator), session_id=session_of(request),
                idempotency_key=label_key_for(key, "thumbs", ids[i], up, tags_now, crit)),
                f"{'up' if up else 'down'} for {LETTERS[i]}"), request)
        return handler

    def on_compare(ids, l_, r_, w_, crit, key, request: gr.Request):
        def act():
            if not ids:
                raise StudioError("generate or load completions first")
            if not w_:
                raise StudioError("choose A wins, B wins, tie or both bad")
            a, b = letters_to_index(l_, len(ids))[0], letters_to_index(r_, len(ids))[0]
            fid = studio.compare(ids[a], ids[b], w_, criterion=crit or "overall",
                                 annotator=annotator_of(request, studio.annotator), session_id=session_of(request),
                                 idempotency_key=label_key_for(key, "pairwise", ids[a], ids[b], w_, crit))
            return _saved("choice", fid, f"{l_} vs {r_}: {w_}")
        return label_result(ids, act, request)

    def on_rank(ids, order, crit, key, request: gr.Request):
        def act():
            idx = ranking_order(order, len(ids))
            ranked = [ids[i] for i in idx]
            fid = studio.rank(ranked, criterion=crit or "overall", annotator=annotator_of(request, studio.annotator),
                              session_id=session_of(request), idempotency_key=label_key_for(key, "ranking", ranked, crit))
            return _saved("ranking", fid, " > ".join(LETTERS[i] for i in idx))
        return label_result(ids, act, request)

    def on_critique(ids, t_, text, rw, crit, key, request: gr.Request):
        def act():
            if not ids:
                raise StudioError("generate or load completions first")
            i = letters_to_index(t_, len(ids))[0]
            out = studio.critique(ids[i], text, rewrite=rw or None, criterion=crit or "overall",
                                  annotator=annotator_of(request, studio.annotator), session_id=session_of(request),
                                  idempotency_key=label_key_for(key, "critique", ids[i], text, rw, crit))
            parts = (["critique"] if "critique_id" in out else []) + (["rewrite"] if "rewrite_id" in out else [])
            return f"{' and '.join(parts)} saved for {t_}"
        res = label_result(ids, act, request)
        if not res[0].startswith(ERROR_PREFIX):
            return res + [gr.update(value=""), gr.update(value="")]
        return res + [gr.skip(), gr.skip()]   # keep the unsaved text on screen for a retry

    def on_undo(ids, key, request: gr.Request):
        """Withdraw this person's newest label; a star shown for it goes back to the label current again."""
        done: dict = {}

        def act():
            done.update(studio.undo(annotator=annotator_of(request, studio.annotator),
                                    idempotency_key=label_key_for(key, "undo")))
            return describe_withdrawal(done)
        res = label_result(ids, act, request)
        star_updates = [gr.skip()] * MAX_N
        lab = done.get("label")
        if lab and lab["kind"] == "stars" and lab["completion_id"] in ids:
            cid = lab["completion_id"]
            now = my_stars([cid], lab["annotator"], lab["criterion"])
            star_updates[ids.index(cid)] = gr.update(value=str(now[cid]) if cid in now else None)
        return res + star_updates

    def latest_completions(prompt_id):
        df = studio.completions(int(prompt_id)).sort_values("id").tail(MAX_N)
        return [int(x) for x in df["id"]], list(df["text"])

    def on_next(crit, request: gr.Request):
        """The prompt with the fewest labels, with its latest completions (or empty cards): the cards must never
        show another prompt's completions, or labels land on the wrong prompt."""
        who = annotator_of(request, studio.annotator)
        p = studio.next_prompt(annotator=who)
        if p is None:
            return [gr.skip(), gr.skip(), fail("the prompt library is empty: type a prompt or import a file")] + \
                [gr.skip()] * (len(slot_outputs) + MAX_N)
        ids, texts_now = latest_completions(p["id"])
        msg = f"prompt #{p['id']} has the fewest labels: " + (
            f"its {len(ids)} latest completions loaded" if ids else "press Generate for completions")
        return [ids, gr.update(value=p["text"]), ok(msg)] + slot_updates(ids, texts_now, my_stars(ids, who, crit)) + \
            scores_for(ids, request)

    def library_choices():
        df = studio.prompts()
        if df is None or len(df) == 0:
            return gr.update(choices=[])
        col = "labels" if "labels" in df.columns else None
        df = df.sort_values([col, "id"] if col else ["id"])
        return gr.update(choices=[(_short(t), int(i)) for i, t in zip(df["id"], df["text"])][:500])

    def on_load(prompt_id, crit, request: gr.Request):
        if prompt_id in (None, ""):
            return [[], gr.skip(), fail("choose a prompt from the library")] + slot_updates([], []) + \
                scores_for([], request)
        ids, texts_now = latest_completions(prompt_id)
        text = studio.prompts().set_index("id").loc[int(prompt_id), "text"]
        stars_now = my_stars(ids, annotator_of(request, studio.annotator), crit)
        return [ids, gr.update(value=text), ok(f"{len(ids)} completions of prompt #{prompt_id} loaded")] + \
            slot_updates(ids, texts_now, stars_now) + scores_for(ids, request)

    def on_criterion(ids, crit, request: gr.Request):
        """Stars shown are this person's for the chosen criterion, not the last criterion's."""
        return star_values(ids, my_stars(ids, annotator_of(request, studio.annotator), crit))

    def on_add_criterion(name, desc, request: gr.Request):
        try:
            require_owner(studio, request, "add criteria")
            studio.add_criterion(name or "", desc or "")
        except StudioError as e:
            return [fail(e), gr.skip(), gr.skip(), gr.skip()]
        names, md = criteria_update()
        return [ok(f"criterion {name.strip()!r} saved: choose it above to label by it"), names, md, gr.update(value="")]

    def criteria_update():
        df = studio.criteria()
        names = list(df["name"]) if len(df) else ["overall"]
        return gr.update(choices=names), rubric_md(df["name"], df["description"])

    def on_suggest(ids, request: gr.Request):
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

    def on_add(text, request: gr.Request):
        try:
            require_owner(studio, request, "add prompts")
            ids = studio.add_prompts([t for t in (text or "").splitlines() if t.strip()], source="manual")
        except StudioError as e:
            return fail(e), gr.skip()
        if not ids:
            return fail("type at least one prompt"), gr.skip()
        return ok(f"{len(ids)} prompts in the library"), gr.update(value="")

    def on_starter(request: gr.Request):
        """A fresh library offers the studio's everyday prompts (studio/data/starter_prompts.txt), one click."""
        try:
            require_owner(studio, request, "add prompts")
            added = studio.load_starter_prompts()
        except StudioError as e:
            return fail(e), gr.skip()
        return ok(f"{added} starter prompts added: press 'Next prompt'"), gr.update(visible=False)

    def on_import_prompts(f, request: gr.Request):
        try:
            n = studio.import_prompts(owner_upload(studio, request, f, "import prompts"))
        except StudioError as e:
            return fail(e)
        return ok(f"{n} prompts imported")

    # ----------------------------------------------------------------- events
    gen_inputs = [prompt, n, max_new, temperature, top_p, seed, adapter]
    gen_outputs = [ids_state, status] + slot_outputs + scores
    gen_event = gen_btn.click(on_generate, gen_inputs, gen_outputs, concurrency_limit=2,
                              concurrency_id="generate", api_name="generate")
    prompt.submit(on_generate, gen_inputs, gen_outputs, concurrency_limit=2, concurrency_id="generate",
                  api_visibility="private")
    stop_btn.click(on_stop, None, status, queue=False, api_name="stop")
    gen_event.then(library_choices, None, library, api_visibility="private")
    label_outputs = [status] + scores + [label_key]
    for i in range(MAX_N):
        stars[i].input(on_star(i), [ids_state, stars[i], criterion, label_key], label_outputs, concurrency_limit=8,
                       api_name=f"rate_{LETTERS[i].lower()}")
        ups[i].click(on_thumb(i, True), [ids_state, tags[i], criterion, label_key], label_outputs,
                     concurrency_limit=8, api_name=f"thumbs_up_{LETTERS[i].lower()}")
        downs[i].click(on_thumb(i, False), [ids_state, tags[i], criterion, label_key], label_outputs,
                       concurrency_limit=8, api_name=f"thumbs_down_{LETTERS[i].lower()}")
    compare_btn.click(on_compare, [ids_state, left, right, winner, criterion, label_key], label_outputs,
                      api_name="compare")
    rank_btn.click(on_rank, [ids_state, ranking, criterion, label_key], label_outputs, api_name="rank")
    critique_btn.click(on_critique, [ids_state, target, critique, rewrite, criterion, label_key],
                       label_outputs + [critique, rewrite], api_name="critique")
    undo_btn.click(on_undo, [ids_state, label_key], label_outputs + stars, api_name="undo_label")
    shown_outputs = [ids_state, prompt, status] + slot_outputs + scores
    next_btn.click(on_next, [criterion], shown_outputs, api_name="next_prompt")
    load_btn.click(on_load, [library, criterion], shown_outputs, api_name="load_prompt")
    criterion.input(on_criterion, [ids_state, criterion], stars, api_visibility="private")
    crit_btn.click(on_add_criterion, [crit_name, crit_desc], [status, criterion, rubric, crit_name],
                   api_name="add_criterion")
    suggest_btn.click(on_suggest, [ids_state], [left, right, suggestion], api_name="suggest_pair")
    add_btn.click(on_add, [new_prompts], [status, new_prompts], api_name="add_prompts").then(
        library_choices, None, library)
    import_btn.click(on_import_prompts, [prompt_file], status, api_name="import_prompts").then(
        library_choices, None, library)
    starter_btn.click(on_starter, None, [status, starter_btn], api_name="load_starter_prompts").then(
        library_choices, None, library)

    def page_load(request: gr.Request):
        empty = len(studio.prompts()) == 0 and role_of(studio, request) == "owner"
        return library_choices(), new_label_key(), gr.update(visible=empty)

    return dict(on_load=(page_load, [library, label_key, starter_btn]), criteria=(criteria_update, [criterion, rubric]),
                adapter=adapter, owner_only=[prompts_box, criteria_box], blind_hidden=[adapter])


_GEN_STOPS: dict = {}


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


def _stars_text(value) -> str:
    return f"{value} star" + ("" if str(value) == "1" else "s")


def _saved(what: str, fid: int, detail: str) -> str:
    return f"{what} saved: {detail} (label #{fid})"


def _short(text: str, n: int = 70) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= n else t[: n - 1] + "…"
