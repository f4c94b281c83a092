"""The reward-hacking watch in the Train tab: the checks of the shown run drawn step by step, and, when the watch
paused it, why, with the answers the reward model likes most and the second judge least; resume, roll back to
the best checkpoint, stop, or a short blind audit (current policy vs best checkpoint) whose votes are labels.
Facade only; handlers are named functions of plain values."""
from __future__ import annotations

import html

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..auth import require_owner
from ..errors import StudioError
from .common import fail, ok

EXAMPLE_COLS = ["which", "prompt", "response", "reward", "judge"]


def checks_figure(checks: pd.DataFrame) -> go.Figure:
    """Training reward and second judge on the probes at each check (left axis), KL and no-EOS share (right);
    pauses marked."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.update_layout(title="Watch checks on the probe prompts", height=320, margin=dict(l=40, r=20, t=50, b=40))
    if checks is None or not len(checks):
        fig.add_annotation(text="no watch checks yet", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
        return fig
    x = checks["step"]
    for col, name, right in (("reward", "training reward", False), ("judge", "second judge", False),
                             ("kl", "KL", True), ("no_eos", "share never ending", True),
                             ("distinct_2", "distinct bigrams", True)):
        if col in checks and checks[col].notna().any():
            fig.add_trace(go.Scatter(x=x, y=checks[col], mode="lines+markers", name=name,
                                     line=dict(dash="dot") if right else None), secondary_y=right)
    paused = checks[checks["verdict"] == "pause"]
    for step in paused["step"]:
        fig.add_vline(x=float(step), line=dict(color="red", dash="dash"))
    fig.update_xaxes(title="step")
    return fig


def examples_table(pause: dict | None) -> pd.DataFrame:
    """The examples of the pausing check as rows: what the reward model likes most, what the judge likes least."""
    rows = []
    ex = (pause or {}).get("examples") or {}
    for which, key in (("reward model likes most", "reward_likes"), ("second judge likes least", "judge_dislikes")):
        for e in ex.get(key) or []:
            rows.append([which, e.get("prompt"), e.get("response"), _num(e.get("reward")), _num(e.get("judge"))])
    return pd.DataFrame(rows, columns=EXAMPLE_COLS)


def _num(v):
    return None if v is None else round(float(v), 3)


def watch_status(studio, run_id) -> tuple[str, pd.DataFrame, pd.DataFrame, dict]:
    """(markdown, checks, examples, visibility of the pause buttons) for a run (None: no run yet)."""
    if run_id is None:
        return "", pd.DataFrame(), examples_table(None), gr.update(visible=False)
    checks = studio.watch_checks(int(run_id))
    pause = studio.watch_pause(int(run_id))
    if pause:
        md = (f"### Paused by the reward-hacking watch at step {pause['step']}\n{html.escape(pause['reason'] or '')}"
              "\n\nRead the examples below, then **resume**, **roll back** to the best checkpoint (by the second "
              "judge), **stop**, or run a short **blind audit** first.")
    elif len(checks):
        last = checks.iloc[-1]
        md = f"Watch: {len(checks)} checks, the last at step {int(last['step'])}: {html.escape(str(last['reason']))}"
    else:
        md = "Watch: no checks for this run (off, or shorter than one check interval)"
    return md, checks, examples_table(pause), gr.update(visible=bool(pause))


def on_resume(studio, run_id) -> str:
    try:
        h = studio.resume_ppo(int(run_id))
    except (StudioError, TypeError, ValueError) as e:
        return fail(e)
    return ok(f"run {h.run_id} resumed; the watch starts again from the resumed policy")


def on_rollback(studio, run_id) -> str:
    try:
        aid = studio.rollback(int(run_id))
    except (StudioError, TypeError, ValueError) as e:
        return fail(e)
    return ok(f"adapter-{aid} holds the best checkpoint of run {run_id}: generate or compare with it")


def on_stop(studio, run_id) -> str:
    try:
        studio.watch_stop(int(run_id))
    except (StudioError, TypeError, ValueError) as e:
        return fail(e)
    return ok(f"run {run_id} stopped (cancelled; it can still be resumed later)")


def on_audit(studio, run_id) -> tuple[str, str, str, list | None]:
    """Start the blind audit: (message, left text, right text, pairs left to vote on)."""
    try:
        pairs = studio.watch_audit(int(run_id), n=4)
    except (StudioError, TypeError, ValueError) as e:
        return fail(e), "", "", None
    return ok(f"blind audit: {len(pairs)} pairs, sides shuffled"), pairs[0]["a_text"], pairs[0]["b_text"], pairs


def on_audit_vote(studio, pairs, winner: str, annotator: str | None = None) -> tuple[str, str, str, list | None]:
    """Store the vote on the first pair as a pairwise label; show the next pair."""
    if not pairs:
        return fail("start a blind audit first"), "", "", None
    p = pairs[0]
    try:
        studio.compare(p["a"], p["b"], winner, annotator=annotator, idempotency_key=f"watch-audit:{p['a']}:{p['b']}")
    except StudioError as e:
        return fail(e), p["a_text"], p["b_text"], pairs
    rest = pairs[1:]
    if not rest:
        return ok("audit done: the votes are labels, the reward model refits with them"), "", "", None
    return ok(f"vote saved; {len(rest)} left"), rest[0]["a_text"], rest[0]["b_text"], rest


def build(studio, timer: gr.Timer, run_id_fn, owner: bool = True) -> None:
    """The panel, refreshed by the Train tab's timer; run_id_fn() gives the run the tab shows."""
    from .common import annotator_of
    with gr.Group(visible=owner):
        status = gr.Markdown(elem_id="watch-status")
        plot = gr.Plot(elem_id="watch-plot")
        examples = gr.Dataframe(examples_table(None), label="Watch examples", interactive=False, wrap=True,
                                elem_id="watch-examples")
        with gr.Row(visible=False) as buttons:
            resume = gr.Button("Resume", elem_id="watch-resume")
            rollback = gr.Button("Roll back to the best checkpoint", elem_id="watch-rollback")
            stop = gr.Button("Stop", elem_id="watch-stop")
            audit = gr.Button("Blind audit (current vs best)", elem_id="watch-audit")
        msg = gr.Markdown(elem_id="watch-msg")
        with gr.Row():
            left = gr.Textbox(label="A", lines=4, interactive=False, elem_id="watch-audit-a")
            right = gr.Textbox(label="B", lines=4, interactive=False, elem_id="watch-audit-b")
        with gr.Row():
            votes = [gr.Button(lbl, size="sm", elem_id=f"watch-vote-{w}") for lbl, w in
                     (("A is better", "a"), ("B is better", "b"), ("Tie", "tie"), ("Both bad", "both_bad"))]
    pairs = gr.State(None)
    seen = gr.State(None)

    def refresh(seen_):
        rid = run_id_fn()
        md, checks, ex, vis = watch_status(studio, rid)
        key = (rid, len(checks), md)
        if key == seen_:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), seen_
        return md, checks_figure(checks), ex, vis, key

    def owner_refusal(request, what: str) -> str | None:
        try:
            require_owner(studio, request, what)        # the server refuses, not only the hidden buttons
        except StudioError as e:
            return fail(e)
        return None

    def run_action(fn, what: str):
        def handler(request: gr.Request):
            rid, refused = run_id_fn(), owner_refusal(request, what)
            return refused or (fail("no run yet") if rid is None else fn(studio, rid))
        return handler

    def audit_handler(request: gr.Request):
        rid, refused = run_id_fn(), owner_refusal(request, "start an audit")
        if refused or rid is None:
            return refused or fail("no run yet"), "", "", None
        return on_audit(studio, rid)

    def vote(winner):
        def handler(pairs_, request: gr.Request):
            return on_audit_vote(studio, pairs_, winner, annotator_of(request, studio.annotator))
        return handler

    timer.tick(refresh, [seen], [status, plot, examples, buttons, seen], show_progress="hidden",
               api_visibility="private")
    resume.click(run_action(on_resume, "resume training"), None, msg)
    rollback.click(run_action(on_rollback, "roll back a run"), None, msg)
    stop.click(run_action(on_stop, "stop a run"), None, msg)
    audit.click(audit_handler, None, [msg, left, right, pairs])
    for btn, (_, w) in zip(votes, (("", "a"), ("", "b"), ("", "tie"), ("", "both_bad"))):
        btn.click(vote(w), [pairs], [msg, left, right, pairs])
