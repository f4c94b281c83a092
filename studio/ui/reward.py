"""Reward model tab: both tiers' current versions, live curves, versions, calibration, likes and dislikes,
and importing preference data."""
from __future__ import annotations


import gradio as gr
import numpy as np
import pandas as pd

from .. import plots
from ..errors import StudioError
from ..auth import require_owner
from .common import fail, ok, owner_upload


def _status_md(studio) -> str:
    rs = studio.reward
    parts = []
    m = studio.reward_metrics()
    for tier in ("fast", "deep"):
        rows = m[m["tier"] == tier] if len(m) else m
        if len(rows) == 0:
            parts.append(f"**{tier} tier**: no version yet")
            continue
        r = rows.sort_values("version").iloc[-1]
        acc = r.get("heldout_accuracy")
        n = int(r.get("heldout_pairs") or 0)
        if acc is None or (isinstance(acc, float) and np.isnan(acc)) or n < 10:
            accs = f"held-out accuracy not shown: only {n} held-out pairs (need 10)"
        else:
            accs = f"held-out accuracy **{acc:.3f}** on {n} pairs (±{np.sqrt(acc * (1 - acc) / n):.3f})"
        parts.append(f"**{tier} tier** v{int(r['version'])} · {int(r['labels_seen'])} labels seen · {accs}")
    p = rs.progress
    if p.running:
        pct = 100 * p.done / max(p.total, 1)
        parts.append(f"{p.message}: {p.done}/{p.total} ({pct:.0f}%)")
    elif p.message:
        parts.append(p.message)
    if rs._deep_thread is not None and rs._deep_thread.is_alive():
        parts.append("deep tier training in the background (labelling continues)")
    if rs.last_error:
        parts.append(f"last problem: {rs.last_error}")
    return "\n\n".join(parts)


def _likes(studio, k: int = 5):
    """(k best, k worst completions by the fast tier's score, all scores) of the latest 2000 completions; empty
    tables and no scores before any reward model exists. The fast model loads on first use: a studio reopened
    on a database has none in memory until something scores."""
    empty = pd.DataFrame(columns=["id", "prompt_id", "score", "text"])
    df = studio.completions()
    if len(df) == 0:
        return empty, empty, None
    df = df.tail(2000)
    scores = studio.reward.visible_scores(list(df["id"]))
    vals = np.array([s[0] if s else np.nan for s in scores])
    if np.isnan(vals).all():
        return empty, empty, None
    df = df.assign(score=vals.round(3)).dropna(subset=["score"])[["id", "prompt_id", "score", "text"]]
    return df.sort_values("score", ascending=False).head(k), df.sort_values("score").head(k), vals


def build(studio, role: str = "owner"):
    owner = role == "owner"
    status = gr.Markdown(elem_id="reward-status")
    with gr.Row(visible=owner) as owner_row:
        refit = gr.Button("Refit fast tier now", elem_id="refit-fast-btn")
        train_deep = gr.Button("Train deep tier now", elem_id="train-deep-btn")
        every = gr.Number(value=studio.reward.settings.deep_every, precision=0, label="Deep update every K new pairs "
                          "(0 = only on demand)", elem_id="deep-every")
    action = gr.Markdown(elem_id="reward-action")
    with gr.Row():
        curves = gr.Plot(label="Accuracy and loss", elem_id="reward-curves")
        calib = gr.Plot(label="Calibration", elem_id="reward-calibration")
    with gr.Row():
        hist = gr.Plot(label="Scores", elem_id="reward-hist")
    versions = gr.Dataframe(label="Versions (select a row to use it for PPO)", interactive=False,
                            elem_id="reward-versions")
    use_version = gr.Markdown()
    with gr.Row():
        best = gr.Dataframe(label="Liked most", interactive=False, wrap=True)
        worst = gr.Dataframe(label="Liked least", interactive=False, wrap=True)
    with gr.Accordion("Import preference pairs (HH-RLHF or TRL prompt/chosen/rejected)", open=False,
                      visible=owner) as import_box:
        upload = gr.File(label="JSONL(.gz) or Parquet", file_types=[".jsonl", ".gz", ".json", ".parquet"],
                         elem_id="pref-file")
        fmt = gr.Radio([("HH-RLHF", "hh"), ("TRL", "trl")], value="hh", label="Format")
        import_btn = gr.Button("Import", elem_id="pref-import-btn")
    timer = gr.Timer(3.0)
    owner_only = [owner_row, import_box]

    def refresh():
        m = studio.reward_metrics()
        last_bins = None
        if len(m):
            fast = m[m["tier"] == "fast"].sort_values("version")
            if len(fast) and "bins" in fast:
                last_bins = fast.iloc[-1]["bins"]
        liked = _likes(studio)
        vers = studio.reward_versions()
        keep = [c for c in ["id", "tier", "parent_id", "labels_seen", "criterion", "created_at"] if c in vers.columns]
        return (_status_md(studio), plots.reward_curves(m), plots.reliability(last_bins),
                plots.score_histogram(liked[2]),
                vers[keep].iloc[::-1] if len(vers) else vers,
                liked[0], liked[1])

    outputs = [status, curves, calib, hist, versions, best, worst]

    def on_refit(request: gr.Request):
        try:
            require_owner(studio, request, "train the reward model")
            v = studio.train_reward_model(tier="fast")
            return ok(f"fast tier refit: version {v}")
        except StudioError as e:
            return fail(e)

    def on_deep(k, request: gr.Request):
        try:
            require_owner(studio, request, "train the reward model")
            studio.reward.settings.deep_every = max(0, int(k or 0))
            studio.train_reward_model(tier="deep", wait=False)
            return ok("deep tier training started in the background")
        except StudioError as e:
            return fail(e)

    def on_every(k, request: gr.Request):
        try:
            require_owner(studio, request, "change reward-model settings")
        except StudioError as e:
            return fail(e)
        studio.reward.settings.deep_every = max(0, int(k or 0))
        return ok(f"deep tier updates every {studio.reward.settings.deep_every} new pairs")

    def on_import(f, fmt_, request: gr.Request):
        try:
            n = studio.import_preferences(owner_upload(studio, request, f, "import data"), format=fmt_)
        except StudioError as e:
            return fail(e)
        return ok(f"imported {n} pairs; reward features are being computed in the background")

    def on_select(evt: gr.SelectData, df, request: gr.Request):
        try:
            require_owner(studio, request, "choose the reward model for training")
        except StudioError as e:
            return fail(e)
        try:
            vid = int(df.iloc[evt.index[0]]["id"])
        except Exception:
            return gr.skip()
        studio.reward.selected_version = vid
        return ok(f"PPO will use reward-model version {vid}")

    refit.click(on_refit, None, action, api_name="refit_fast").then(refresh, None, outputs)
    train_deep.click(on_deep, [every], action, api_name="train_deep")
    every.submit(on_every, [every], action, api_name="deep_every")
    import_btn.click(on_import, [upload, fmt], action, api_name="import_preferences").then(refresh, None, outputs)
    versions.select(on_select, [versions], use_version)
    timer.tick(refresh, None, outputs, api_visibility="private")
    return dict(on_load=(refresh, None, outputs), owner_only=owner_only)
