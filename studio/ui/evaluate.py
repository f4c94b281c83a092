"""Evaluate tab: a policy against a baseline on held-out prompts, judged by the reward model or by blind human
votes; the win rate with its 95% interval, both sides' lengths, the reward model's agreement with the votes, per
criterion, and every evaluation so far. Annotators vote on the queued pairs here; running an evaluation and
marking prompts held-out are the owner's."""
from __future__ import annotations

import math

import gradio as gr
import pandas as pd

from ..auth import require_owner
from ..errors import StudioError
from .common import annotator_of, blind_view, fail, md_text, ok, policy_names, session_of

JUDGES = [("Reward model", "reward"), ("Blind human votes", "human")]
WINNERS = [("Left is better", "a"), ("Right is better", "b"), ("Tie", "tie"), ("Both bad", "both_bad")]
HISTORY_COLUMNS = ["id", "policy", "baseline", "judge", "criterion", "judged", "pending", "win_rate", "ci_low",
                   "ci_high", "policy_tokens", "baseline_tokens", "agreement", "agreement_n", "reward_version",
                   "created_at"]


def build(studio, role: str = "owner"):
    gr.Markdown("Compare a policy with a baseline on **held-out prompts** (never trained on): the same seed on "
                "both sides, judged by the reward model or by blind votes of annotators. Win rate counts ties as "
                "one half; the interval is Wilson's 95% interval; lengths are mean new tokens.")
    with gr.Column(visible=role == "owner") as run_box:
        with gr.Row():
            policy = gr.Dropdown(["base"], value="base", label="Policy", elem_id="eval-policy")
            baseline = gr.Dropdown(["base"], value="base", label="Baseline", elem_id="eval-baseline")
            judge = gr.Radio(JUDGES, value="reward", label="Judge", elem_id="eval-judge")
            criterion = gr.Dropdown(["overall"], value="overall", label="Criterion", elem_id="eval-criterion")
        with gr.Row():
            n = gr.Number(0, precision=0, label="Prompts (0 = every held-out prompt)", elem_id="eval-n")
            max_new = gr.Number(64, precision=0, label="Max new tokens", elem_id="eval-max-new")
            seed = gr.Number(0, precision=0, label="Seed", elem_id="eval-seed")
            run_btn = gr.Button("Run evaluation", variant="primary", elem_id="eval-run")
    status = gr.Markdown(elem_id="eval-status")
    with gr.Column() as results_box:      # names policies and shows win rates: hidden in blind mode
        result = gr.Markdown(elem_id="eval-result")
        with gr.Row():
            by_criterion = gr.Dataframe(label="Newest result per criterion", interactive=False,
                                        elem_id="eval-criteria")
        history = gr.Dataframe(label="Evaluations", interactive=False, elem_id="eval-history")
        refresh_btn = gr.Button("Refresh", size="sm", elem_id="eval-refresh")
    with gr.Accordion("Vote on queued pairs (blind)", open=True):
        pair_prompt = gr.Markdown(elem_id="eval-vote-prompt")
        with gr.Row():
            left = gr.Textbox(label="Left", lines=6, interactive=False, elem_id="eval-left")
            right = gr.Textbox(label="Right", lines=6, interactive=False, elem_id="eval-right")
        with gr.Row():
            vote_btns = [gr.Button(label, elem_id=f"eval-vote-{w}") for label, w in WINNERS]
            next_btn = gr.Button("Next pair", size="sm", elem_id="eval-next")
        vote_status = gr.Markdown(elem_id="eval-vote-status")
    pair = gr.State(None)
    with gr.Accordion("Held-out prompts", open=False):
        heldout = gr.Dataframe(label="Kept aside from training", interactive=False, elem_id="eval-heldout")
        with gr.Row(visible=role == "owner") as mark_box:
            mark_text = gr.Textbox(label="Hold out these prompts (one per line)", lines=2, elem_id="eval-mark")
            mark_btn = gr.Button("Hold out", elem_id="eval-mark-btn")

    # ----------------------------------------------------------------- events
    def on_run(p, b, j, c, n_, m, s, request: gr.Request):
        return run_evaluation(studio, p, b, j, c, n_, m, s, request)

    def on_next(request: gr.Request):
        return next_pair(studio, request)

    def on_vote(winner):
        def handler(current, request: gr.Request):
            return vote(studio, current, winner, request)
        handler.__name__ = f"on_vote_{winner}"
        return handler

    def on_mark(text, request: gr.Request):
        return mark_heldout(studio, text, request)

    def on_open(request: gr.Request):
        return choices(studio, request) + results(studio, request) + list(next_pair(studio, request))

    def on_refresh(request: gr.Request):
        return results(studio, request)

    tables_out = [history, by_criterion, heldout]
    pair_out = [pair_prompt, left, right, pair, vote_status]
    run_btn.click(on_run, [policy, baseline, judge, criterion, n, max_new, seed], [status, result] + tables_out,
                  concurrency_limit=1, concurrency_id="evaluate", api_name="evaluate")
    refresh_btn.click(on_refresh, None, [result] + tables_out, api_visibility="private")
    next_btn.click(on_next, None, pair_out, api_name="evaluation_next_pair")
    for btn, (_, w) in zip(vote_btns, WINNERS):
        btn.click(on_vote(w), [pair], pair_out, api_name=f"evaluation_vote_{w}")
    mark_btn.click(on_mark, [mark_text], [vote_status, mark_text, heldout], api_name="hold_out")
    return dict(on_load=(on_open, None, [policy, baseline, criterion, result] + tables_out + pair_out),
                owner_only=[run_box, mark_box], blind_hidden=[results_box])


# ------------------------------------------------------------------------------------------------ handlers
def run_evaluation(studio, policy, baseline, judge, criterion, n, max_new_tokens, seed, request=None) -> list:
    """[status, result markdown, history, per criterion, held-out prompts] after running one evaluation."""
    try:
        require_owner(studio, request, "run evaluations")
        r = studio.evaluate(policy or "base", baseline or "base", judge=judge, criterion=criterion or "overall",
                            n=_whole(n, "Prompts", 0) or None, seed=_whole(seed, "Seed", 0),
                            max_new_tokens=_whole(max_new_tokens, "Max new tokens", 1))
    except StudioError as e:
        return [fail(e), gr.skip()] + [gr.skip()] * 3
    what = "queued for blind votes" if r["judge"] == "human" else "judged"
    return [ok(f"evaluation {r['id']}: {r['pairs']} pairs {what}"), result_markdown(r)] + tables(studio)


def _whole(v, name: str, minimum: int) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise StudioError(f"{name} must be a whole number, got {v!r}") from None
    if not f.is_integer() or f < minimum:
        raise StudioError(f"{name} must be a whole number of at least {minimum}, got {v!r}")
    return int(f)


def result_markdown(r: dict) -> str:
    """One evaluation's result in words."""
    head = (f"**Evaluation {r['id']}**: {md_text(r['policy'])} vs {md_text(r['baseline'])}, judge "
            f"{md_text(r['judge'])}, criterion {md_text(r['criterion'])}")
    if not r["judged"]:
        return head + f"\n\nNo verdicts yet: {r['pending']} pairs wait for votes."
    rate = (f"win rate of {md_text(r['policy'])}: **{r['win_rate']:.0%}** (95% interval {r['ci_low']:.0%}–{r['ci_high']:.0%}; "
            f"{r['wins']} wins, {r['losses']} losses, {r['ties']} ties of {r['judged']})")
    lengths = f"mean length: {_num(r['policy_tokens'])} tokens vs {_num(r['baseline_tokens'])}"
    lines = [head, rate, lengths]
    if r["pending"]:
        lines.append(f"{r['pending']} pairs still wait for a vote")
    if r["agreement_n"]:
        lines.append(f"reward model agrees with the votes on {r['agreement']:.0%} of {r['agreement_n']} decisive votes")
    return "\n\n".join(lines)


def latest_result(studio) -> str:
    """The newest evaluation's result in words (human votes so far included), or "" when there is none."""
    df = studio.evaluations()
    return result_markdown(studio.evaluation(int(df["id"].iloc[-1]))) if len(df) else ""


def _num(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def tables(studio) -> list:
    """[every evaluation, the newest result per criterion, the held-out prompts] as shown in the tab."""
    df = studio.evaluations()
    hist = df[HISTORY_COLUMNS].round(_ROUNDED).iloc[::-1] if len(df) else pd.DataFrame(columns=HISTORY_COLUMNS)
    newest = df.sort_values("id").groupby(["criterion", "policy", "baseline", "judge"], as_index=False).last() \
        if len(df) else df
    cols = ["criterion", "policy", "baseline", "judge", "win_rate", "ci_low", "ci_high", "judged", "agreement"]
    per_crit = newest[cols].round(_ROUNDED) if len(df) else pd.DataFrame(columns=cols)
    return [hist, per_crit, studio.heldout_prompts()]


_ROUNDED = dict.fromkeys(["win_rate", "ci_low", "ci_high", "policy_tokens", "baseline_tokens", "agreement"], 3)


def results(studio, request=None) -> list:
    """[result in words, every evaluation, the newest result per criterion, the held-out prompts]; in blind mode
    an annotator gets the held-out prompts only (results name policies)."""
    if blind_view(studio, request):
        return [gr.skip(), gr.skip(), gr.skip(), studio.heldout_prompts()]
    return [latest_result(studio)] + tables(studio)


def choices(studio, request=None) -> list:
    if blind_view(studio, request):
        return [gr.skip()] * 3
    names = policy_names(studio)
    crit = list(studio.criteria()["name"]) or ["overall"]
    return [gr.update(choices=names, value=names[-1]), gr.update(choices=names), gr.update(choices=crit)]


def next_pair(studio, request=None) -> tuple:
    """(prompt, left text, right text, the pair as state, status) of the next pair this person has not voted on."""
    nxt = studio.next_evaluation_pair(annotator_of(request, studio.annotator))
    if nxt is None:
        return "", "", "", None, ok("no pairs waiting for your vote")
    prompt = f"**Prompt** (criterion *{md_text(nxt['criterion'])}*): {md_text(nxt['prompt'])}"
    return prompt, nxt["left_text"], nxt["right_text"], nxt, ""


def vote(studio, current, winner: str, request=None) -> tuple:
    """Store the vote as a pairwise label on the pair shown, then show the next pair."""
    if not current:
        return gr.skip(), gr.skip(), gr.skip(), None, fail("no pair shown: press Next pair")
    who = annotator_of(request, studio.annotator)
    try:
        studio.compare(current["left_id"], current["right_id"], winner, criterion=current["criterion"],
                       annotator=who, session_id=session_of(request),
                       idempotency_key=f"eval-vote:{current['evaluation_id']}:{current['idx']}:{who}")
    except StudioError as e:
        return gr.skip(), gr.skip(), gr.skip(), current, fail(e)
    *shown, status = next_pair(studio, request)
    return (*shown, ok("vote saved. ") + (status or "next pair shown"))


def mark_heldout(studio, text, request=None) -> tuple:
    """(status, cleared text box, held-out prompts) after holding out the prompts typed, one per line."""
    try:
        require_owner(studio, request, "hold out prompts")
        lines = [t.strip() for t in (text or "").splitlines() if t.strip()]
        if not lines:
            raise StudioError("type at least one prompt")
        new = studio.hold_out(lines)
    except StudioError as e:
        return fail(e), gr.skip(), gr.skip()
    return ok(f"{new} prompts newly held out"), "", studio.heldout_prompts()
