"""Blind A/B compare: the same prompt answered by two policies, sides randomised, identities hidden until the
vote; votes are stored as pairwise feedback, and each policy's win rate is shown. In blind mode (--blind) an
annotator sees no policy at all: the server picks the two, never reveals them and sends no win rates. Handlers
first (functions of the studio, plain values and the caller's request), then the layout with its events."""
from __future__ import annotations

import random

import gradio as gr

from ..errors import StudioError
from .common import annotator_of, bind, blind_view, fail, md_text, ok, policy_names, session_of


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


def _refused(message) -> list:
    """on_generate's answer when nothing is generated: the texts stay, the message says why, no pair is kept."""
    return [gr.skip(), gr.skip(), fail(message), None]


def on_generate(studio, prompt, policy_a, policy_b, new_tokens, request: gr.Request = None) -> list:
    """[left text, right text, message, secret pair]: one completion of `prompt` by each policy, sides shuffled.
    The secret (ids and policies of both sides) stays on the server side of the page until the vote."""
    blind = blind_view(studio, request)
    if blind:
        names = policy_names(studio)
        if len(names) < 2:
            return _refused("there is only the base model so far: nothing to compare yet")
        policy_a, policy_b = random.sample(names, 2)
    if policy_a == policy_b:
        return _refused("pick two different policies")
    try:
        tokens = max_new_tokens(new_tokens)
    except StudioError as e:
        return _refused(e)
    try:
        first = studio.generate(prompt, n=1, max_new_tokens=tokens, adapter=policy_a, prompt_source="blind")[0]
        second = studio.generate(prompt, n=1, max_new_tokens=tokens, adapter=policy_b, prompt_source="blind")[0]
    except Exception as e:
        if blind:      # the message may name a policy
            return _refused("the blind pair could not be generated: ask the studio's owner")
        if not isinstance(e, StudioError):
            raise
        return _refused(e)
    pair = [(first, policy_a), (second, policy_b)]
    random.shuffle(pair)
    s = {"left": pair[0][0].id, "right": pair[1][0].id, "left_policy": pair[0][1], "right_policy": pair[1][1]}
    hint = "Vote for the better one." if blind else "Vote, then the policies are revealed."
    return [pair[0][0].text, pair[1][0].text, hint, s]


def on_vote(studio, winner: str, s, request: gr.Request = None) -> list:
    """[message, win rates, secret]: the vote as a pairwise label (once per pair, however often sent), then the
    policies revealed, except in blind mode."""
    if not s:
        return [fail("generate a blind pair first"), gr.skip(), None]
    try:
        studio.compare(s["left"], s["right"], winner, annotator=annotator_of(request, studio.annotator),
                       session_id=session_of(request), idempotency_key=f"blind-vote:{s['left']}:{s['right']}")
    except StudioError as e:
        return [fail(e), gr.skip(), s]
    if blind_view(studio, request):
        return [ok("vote saved (blind mode: the policies stay hidden)."), gr.skip(), None]
    return [f"{ok('vote saved.')} Left was **{md_text(s['left_policy'])}**, right was "
            f"**{md_text(s['right_policy'])}**.", studio.policy_winrates(), None]


def choices(studio, request: gr.Request = None) -> tuple:
    """On page load: both policy lists (the second on the newest policy) and the win rates."""
    if blind_view(studio, request):
        return gr.skip(), gr.skip(), None
    names = policy_names(studio)
    return gr.update(choices=names), gr.update(choices=names, value=names[-1]), studio.policy_winrates()


def refresh(studio, request: gr.Request = None) -> tuple:
    """New adapters in both lists (the choices made stay) and the win rates as they are now: on opening the
    tab and when a training run adds an adapter (app.py wires both)."""
    if blind_view(studio, request):
        return gr.skip(), gr.skip(), None
    names = policy_names(studio)
    return gr.update(choices=names), gr.update(choices=names), studio.policy_winrates()


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
        votes = [(gr.Button(lbl, elem_id=f"blind-vote-{v}"), v) for lbl, v in
                 [("Left is better", "a"), ("Right is better", "b"), ("Tie", "tie"), ("Both bad", "both_bad")]]
    reveal = gr.Markdown(elem_id="blind-reveal")
    table = gr.Dataframe(label="Win rate per policy (blind votes)", interactive=False, elem_id="blind-winrates")
    secret = gr.State(None)

    go_btn.click(bind(on_generate, studio), [prompt, pol_a, pol_b, new_tokens], [left, right, reveal, secret])
    for btn, winner in votes:
        btn.click(bind(on_vote, studio, winner), [secret], [reveal, table, secret])
    return dict(on_load=(bind(choices, studio), None, [pol_a, pol_b, table]),
                refresh=(bind(refresh, studio), None, [pol_a, pol_b, table]), blind_hidden=[pol_a, pol_b, table])
