"""Blind A/B compare: the same prompt answered by two policies, sides randomised, identities hidden until the
vote; votes are stored as pairwise feedback, and each policy's win rate is shown. In blind mode (--blind) an
annotator sees no policy at all: the server picks the two, never reveals them and sends no win rates."""
from __future__ import annotations

import random

import gradio as gr

from ..errors import StudioError
from .common import annotator_of, blind_view, fail, md_text, ok, policy_names, session_of


MAX_NEW_TOKENS = 4096   # components.generation.SamplingParams' bound


def max_new_tokens(n) -> int:
    """The "Max new tokens" field as a whole number of at least 1; StudioError otherwise (0 or an empty field
    used to become 64 without a word)."""
    if n is None or (isinstance(n, str) and not n.strip()):
        raise StudioError("enter how many new tokens each policy may write (Max new tokens)")
    try:
        v = float(n)
    except (TypeError, ValueError):
        raise StudioError(f"Max new tokens must be a whole number, got {n!r}") from None
    if isinstance(n, bool) or not v.is_integer() or not 1 <= v <= MAX_NEW_TOKENS:
        raise StudioError(f"Max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, got {n!r}")
    return int(v)


def build(studio, role: str = "owner"):
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="blind-prompt", scale=3)
        pol_a = gr.Dropdown(["base"], value="base", label="Policy 1", elem_id="blind-policy-1")
        pol_b = gr.Dropdown(["base"], value="base", label="Policy 2", elem_id="blind-policy-2")
        new_tokens = gr.Number(64, precision=0, label="Max new tokens", elem_id="blind-new-tokens")
    go_btn = gr.Button("Generate blind pair", variant="primary", elem_id="blind-generate")
    with gr.Row():
        left = gr.Textbox(label="Left", lines=8, interactive=False, elem_id="blind-left")
        right = gr.Textbox(label="Right", lines=8, interactive=False, elem_id="blind-right")
    with gr.Row():
        votes = [gr.Button(lbl, elem_id=f"blind-vote-{v}") for lbl, v in
                 [("Left is better", "a"), ("Right is better", "b"), ("Tie", "tie"), ("Both bad", "both_bad")]]
    reveal = gr.Markdown(elem_id="blind-reveal")
    table = gr.Dataframe(label="Win rate per policy (blind votes)", interactive=False, elem_id="blind-winrates")
    secret = gr.State(None)

    def on_generate(p, a, b, n, request: gr.Request = None):
        if blind_view(studio, request):
            names = policy_names(studio)
            if len(names) < 2:
                return [gr.skip(), gr.skip(), fail("there is only the base model so far: nothing to compare yet"),
                        None]
            a, b = random.sample(names, 2)
        if a == b:
            return [gr.skip(), gr.skip(), fail("pick two different policies"), None]
        try:
            tokens = max_new_tokens(n)
        except StudioError as e:
            return [gr.skip(), gr.skip(), fail(e), None]
        try:
            first = studio.generate(p, n=1, max_new_tokens=tokens, adapter=a, prompt_source="blind")[0]
            second = studio.generate(p, n=1, max_new_tokens=tokens, adapter=b, prompt_source="blind")[0]
        except Exception as e:
            if blind_view(studio, request):      # the message may name a policy
                return [gr.skip(), gr.skip(), fail("the blind pair could not be generated: ask the studio's owner"),
                        None]
            if not isinstance(e, StudioError):
                raise
            return [gr.skip(), gr.skip(), fail(e), None]
        pair = [(first, a), (second, b)]
        random.shuffle(pair)
        s = {"left": pair[0][0].id, "right": pair[1][0].id, "left_policy": pair[0][1], "right_policy": pair[1][1]}
        hint = "Vote for the better one." if blind_view(studio, request) else "Vote, then the policies are revealed."
        return [pair[0][0].text, pair[1][0].text, hint, s]

    def vote(winner):
        def handler(s, request: gr.Request):
            if not s:
                return [fail("generate a blind pair first"), gr.skip(), None]
            try:
                studio.compare(s["left"], s["right"], winner, annotator=annotator_of(request, studio.annotator),
                               session_id=session_of(request),   # one vote per blind pair, however often sent
                               idempotency_key=f"blind-vote:{s['left']}:{s['right']}")
            except StudioError as e:
                return [fail(e), gr.skip(), s]
            if blind_view(studio, request):
                return [ok("vote saved (blind mode: the policies stay hidden)."), gr.skip(), None]
            return [f"{ok('vote saved.')} Left was **{md_text(s['left_policy'])}**, right was "
                    f"**{md_text(s['right_policy'])}**.", studio.policy_winrates(), None]
        return handler

    def choices(request: gr.Request = None):
        if blind_view(studio, request):
            return gr.skip(), gr.skip(), None
        names = policy_names(studio)
        return gr.update(choices=names), gr.update(choices=names, value=names[-1]), studio.policy_winrates()

    def refresh(request: gr.Request = None):
        """New adapters in both lists (the choices made stay) and the win rates as they are now: on opening the
        tab and when a training run adds an adapter (app.py wires both)."""
        if blind_view(studio, request):
            return gr.skip(), gr.skip(), None
        names = policy_names(studio)
        return gr.update(choices=names), gr.update(choices=names), studio.policy_winrates()

    go_btn.click(on_generate, [prompt, pol_a, pol_b, new_tokens], [left, right, reveal, secret])
    for btn, w in zip(votes, ["a", "b", "tie", "both_bad"]):
        btn.click(vote(w), [secret], [reveal, table, secret])
    return dict(on_load=(choices, None, [pol_a, pol_b, table]), refresh=(refresh, None, [pol_a, pol_b, table]),
                blind_hidden=[pol_a, pol_b, table])
