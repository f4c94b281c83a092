"""History tab: prompts, completions and labels, filterable."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from ..auth import role_of
from ..errors import StudioError
from .common import annotator_of, blind_view, fail, ok, session_of

KINDS = ["all", "stars", "thumbs", "pairwise", "ranking", "critique", "rewrite"]
_MAX_ROWS = 2000


def _filter_text(df, needle: str, columns: list[str]):
    if not needle or df is None or len(df) == 0:
        return df
    mask = None
    for c in columns:
        if c in df.columns:
            m = df[c].astype(str).str.contains(needle, case=False, regex=False, na=False)
            mask = m if mask is None else (mask | m)
    return df[mask] if mask is not None else df


def _present(v) -> bool:
    if v is None:
        return False
    try:
        return not bool(pd.isna(v))
    except (TypeError, ValueError):       # an array (a ranking) is present
        return True


def _label_text(r) -> str:
    """One label's value in words: what a person gave, on which completions (#id)."""
    kind = r["kind"]
    if kind == "stars":
        n = int(r["stars"])
        return f"{n} star{'s' if n != 1 else ''} for #{r['completion_id']}"
    if kind == "thumbs":
        return f"{'up' if bool(r['up']) else 'down'} for #{r['completion_id']}"
    if kind == "pairwise":
        winner = {"a": f"#{r['completion_id']} wins", "b": f"#{r['other_completion_id']} wins", "tie": "tie",
                  "both_bad": "both bad"}.get(str(r["winner"]), str(r["winner"]))
        return f"#{r['completion_id']} vs #{r['other_completion_id']}: {winner}"
    if kind == "ranking":
        return " > ".join(f"#{int(i)}" for i in r["ranking"])
    if kind == "rewrite" or _present(r.get("rewrite_completion_id")):
        return f"#{r['completion_id']} rewritten as #{r['rewrite_completion_id']}"
    return f"{kind} of #{r['completion_id']}" if _present(r.get("completion_id")) else kind


def describe_withdrawal(out: dict) -> str:
    """What `Studio.retract` / `Studio.undo` did, in words."""
    lab = out["label"]
    msg = f"withdrew label #{lab['id']} ({lab['kind']}: {_label_text(lab)})"
    if out.get("restored_id") is not None:
        msg += f"; the label it had replaced (#{out['restored_id']}) is current again"
    return msg


def readable_labels(fb: pd.DataFrame, prompts: pd.DataFrame) -> pd.DataFrame:
    """The labels table a person reads: when, what kind, the prompt, the label in words, the note (critique
    text, reason tags), who and from where; ids for cross-reference. Internal columns (session, idempotency
    key) stay in the database and the exports."""
    cols = ["id", "when", "kind", "criterion", "prompt", "label", "note", "annotator", "source"]
    cols += [c for c in ("superseded", "retracted") if c in fb.columns]
    if len(fb) == 0:
        return pd.DataFrame(columns=cols)
    texts = prompts.set_index("id")["text"] if len(prompts) else pd.Series(dtype=str)

    def note(r) -> str:
        parts = [str(r["text"])] if _present(r["text"]) else []
        if _present(r["tags"]) and len(r["tags"]):
            parts.append("tags: " + ", ".join(map(str, r["tags"])))
        return " · ".join(parts)
    rows = [r for _, r in fb.iterrows()]
    out = fb.assign(when=fb["created_at"].dt.strftime("%Y-%m-%d %H:%M:%S"),
                    prompt=[f"#{p} {str(texts.get(p, ''))[:80]}" for p in fb["prompt_id"]],
                    label=[_label_text(r) for r in rows], note=[note(r) for r in rows])
    return out[cols]


def readable_completions(cs: pd.DataFrame, policy: bool = True) -> pd.DataFrame:
    """The completions table a person reads: short columns first, the text last (it takes the width left);
    sampling parameters and the model's revision hash stay in the database and the exports. policy=False: no
    policy column (blind mode)."""
    cols = ["id", "when", "prompt_id", "source"] + (["policy"] if policy else []) + \
        ["tokens", "finish", "seed", "corrects", "text"]
    if len(cs) == 0:
        return pd.DataFrame(columns=cols)
    policy = ["base" if not _present(a) else f"adapter-{int(a)}" for a in cs["adapter_id"]]
    return cs.assign(when=cs["created_at"].dt.strftime("%Y-%m-%d %H:%M:%S"), policy=policy,
                     tokens=cs["completion_tokens"], finish=cs["finish_reason"],
                     corrects=cs["corrects_id"])[cols]


def history_tables(studio, kind: str = "all", annotator: str = "", search: str = "", replaced: bool = False,
                   policy: bool = True) -> tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The History tab's contents: (summary, labels, completions, prompts), newest first, at most _MAX_ROWS each.
    kind: one label kind or "all"; annotator: part of a name; search: text the labels (critique, tags, winner),
    completions and prompts contain; replaced: replaced and withdrawn labels too; policy: the completions' policy
    column (False in blind mode)."""
    fb = studio.feedback(history=bool(replaced))
    if kind and kind != "all":
        fb = fb[fb["kind"] == kind]
    if annotator:
        fb = fb[fb["annotator"].astype(str).str.contains(annotator.strip(), case=False, regex=False)]
    fb = _filter_text(fb, search, ["text", "tags", "winner"])
    cs = _filter_text(studio.completions(), search, ["text"])
    all_prompts = studio.prompts()
    ps = _filter_text(all_prompts, search, ["text"])
    md = f"{len(ps)} prompts · {len(cs)} completions · {len(fb)} labels shown"
    return (md, readable_labels(fb.tail(_MAX_ROWS).iloc[::-1], all_prompts),
            readable_completions(cs.tail(_MAX_ROWS).iloc[::-1], policy=policy), ps.tail(_MAX_ROWS).iloc[::-1])


def withdraw_label(studio, label_id, reason: str | None, annotator: str, session: str | None, owner: bool) -> str:
    """Withdraw a label by id, as `annotator`: owners may withdraw anyone's (e.g. a spammer's), annotators only
    their own. The Markdown message to show (an error message starts with ERROR_PREFIX)."""
    if label_id is None:
        return fail("type the id of the label to withdraw (the id column above)")
    try:
        out = studio.retract(int(label_id), reason or None, annotator=annotator, session_id=session,
                             own_only=not owner, idempotency_key=f"ui:withdraw:{session}:{int(label_id)}")
    except StudioError as e:
        return fail(e)
    return ok(describe_withdrawal(out))


def build(studio, role: str = "owner"):
    with gr.Row():
        kind = gr.Dropdown(KINDS, value="all", label="Label kind", elem_id="history-kind")
        annotator = gr.Textbox(label="Annotator", elem_id="history-annotator")
        search = gr.Textbox(label="Text contains", elem_id="history-search")
        replaced = gr.Checkbox(label="Include replaced and withdrawn labels (history)", elem_id="history-replaced")
        refresh = gr.Button("Refresh", elem_id="history-refresh")
    summary = gr.Markdown(elem_id="history-summary")
    with gr.Accordion("Withdraw a label given by mistake", open=False):
        with gr.Row():
            withdraw_id = gr.Number(label="Label id (the id column)", precision=0, elem_id="withdraw-id")
            withdraw_reason = gr.Textbox(label="Reason (optional)", elem_id="withdraw-reason", max_lines=1)
            withdraw_btn = gr.Button("Withdraw", elem_id="withdraw-btn")
        withdraw_status = gr.Markdown(elem_id="withdraw-status")
    with gr.Tab("Labels"):
        labels = gr.Dataframe(elem_id="history-labels", interactive=False, wrap=True)
    with gr.Tab("Completions"):
        completions = gr.Dataframe(elem_id="history-completions", interactive=False, wrap=True)
    with gr.Tab("Prompts"):
        prompts = gr.Dataframe(elem_id="history-prompts", interactive=False, wrap=True)

    def load(kind_, annotator_, search_, replaced_, request: gr.Request = None):
        return history_tables(studio, kind_, annotator_, search_, replaced_, policy=not blind_view(studio, request))

    def on_withdraw(label_id, reason, request: gr.Request):
        return withdraw_label(studio, label_id, reason, annotator_of(request, studio.annotator), session_of(request),
                              owner=role_of(studio, request) == "owner")

    inputs = [kind, annotator, search, replaced]
    outputs = [summary, labels, completions, prompts]
    withdraw_btn.click(on_withdraw, [withdraw_id, withdraw_reason], withdraw_status, api_name="withdraw_label").then(
        load, inputs, outputs)
    refresh.click(load, inputs, outputs)
    for c in (kind, replaced):
        c.change(load, inputs, outputs)
    search.submit(load, inputs, outputs)
    annotator.submit(load, inputs, outputs)
    return dict(on_load=(load, inputs, outputs))
