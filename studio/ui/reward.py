"""Reward model tab: both tiers' current versions, live curves, versions, calibration, likes and dislikes,
and importing preference data."""
from __future__ import annotations


import gradio as gr
import numpy as np
import pandas as pd

from .. import plots
from ..errors import StudioError
from ..auth import require_owner
from .common import blind_view, fail, md_text, ok, owner_upload, unless_sent


def _status_md(studio, m: pd.DataFrame | None = None) -> str:
    rs = studio.reward_status()
    parts = []
    m = studio.reward_metrics() if m is None else m
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
    if rs["running"]:
        pct = 100 * rs["done"] / max(rs["total"], 1)
        parts.append(f"{md_text(rs['message'])}: {rs['done']}/{rs['total']} ({pct:.0f}%)")
    elif rs["message"]:
        parts.append(md_text(rs["message"]))
    if rs["deep_training"]:
        parts.append("deep tier training in the background (labelling continues)")
    if rs["last_error"]:       # may quote an imported file's name or text
        parts.append(f"last problem: {md_text(rs['last_error'])}")
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
    scores = studio.completion_scores(df["id"])
    vals = np.array([s[0] if s else np.nan for s in scores])
    if np.isnan(vals).all():
        return empty, empty, None
    df = df.assign(score=vals.round(3)).dropna(subset=["score"])[["id", "prompt_id", "score", "text"]]
    return df.sort_values("score", ascending=False).head(k), df.sort_values("score").head(k), vals


PPO_COLUMN = "for PPO"


def versions_table(vers):
    """The versions table, newest first, with whether PPO can use a version (automatic fast refits keep their
    metrics but store their weights only now and then)."""
    if vers is None or not len(vers):
        return vers
    keep = [c for c in ["id", "tier", "parent_id", "labels_seen", "criterion", "created_at"] if c in vers.columns]
    out = vers[keep].copy()
    if "weights_bytes" in vers.columns:
        out.insert(2, PPO_COLUMN, ["yes" if pd.notna(b) and b > 0 else "no" for b in vers["weights_bytes"]])
    return out.iloc[::-1]


def build(studio, role: str = "owner"):
    owner = role == "owner"
    status = gr.Markdown(elem_id="reward-status")
    with gr.Row(visible=owner) as owner_row:
        refit = gr.Button("Refit fast tier now", elem_id="refit-fast-btn")
        train_deep = gr.Button("Train deep tier now", elem_id="train-deep-btn")
        every = gr.Number(value=studio.reward_status()["deep_every"], precision=0, label="Deep update every K new pairs "
                          "(0 = only on demand)", elem_id="deep-every")
    action = gr.Markdown(elem_id="reward-action")
    with gr.Row():
        curves = gr.Plot(label="Accuracy and loss", elem_id="reward-curves")
        calib = gr.Plot(label="Calibration", elem_id="reward-calibration")
    with gr.Row() as hist_row:
        hist = gr.Plot(label="Scores", elem_id="reward-hist")
    versions = gr.Dataframe(label="Versions (select a row to pin it for PPO launches from this browser tab)",
                            interactive=False, elem_id="reward-versions")
    use_version = gr.Markdown(elem_id="reward-pin")
    # the version chosen for PPO belongs to this browser tab (the Train tab reads it, shows it and can drop it)
    pinned = gr.State(None)
    with gr.Row() as liked_row:
        best = gr.Dataframe(label="Liked most", interactive=False, wrap=True, elem_id="reward-liked-most")
        worst = gr.Dataframe(label="Liked least", interactive=False, wrap=True, elem_id="reward-liked-least")
    with gr.Accordion("Import preference pairs (HH-RLHF or TRL prompt/chosen/rejected)", open=False,
                      visible=owner) as import_box:
        upload = gr.File(label="JSONL(.gz) or Parquet", file_types=[".jsonl", ".gz", ".json", ".parquet"],
                         elem_id="pref-file")
        fmt = gr.Radio([("HH-RLHF", "hh"), ("TRL", "trl")], value="hh", label="Format")
        import_btn = gr.Button("Import", elem_id="pref-import-btn")
    with gr.Accordion("Export a version for TRL / OpenRLHF / verl (AutoModelForSequenceClassification)",
                      open=False, visible=owner) as export_box:
        with gr.Row():
            export_version = gr.Number(label="Version id (a row of the table)", precision=0,
                                       elem_id="reward-export-version")
            export_dir = gr.Textbox(label="New folder in the export folder", value="reward-model",
                                    elem_id="reward-export-dir")
        export_btn = gr.Button("Export reward model", elem_id="reward-export-btn")
    # Gradio ticks it only while this tab is open; `sent`: what this browser tab was last sent, so that a tick
    # rebuilds and sends only what changed (it rescored every completion and redrew four plots every 3 s)
    timer = gr.Timer(3.0)
    sent = gr.State(None)
    owner_only = [owner_row, import_box, export_box]

    def refresh(sent_=None, request: gr.Request = None):
        sent_, now = sent_ or {}, {}
        m = studio.reward_metrics()
        vers = studio.reward_versions()

        def calibration(_):
            fast = m[m["tier"] == "fast"].sort_values("version") if len(m) else m
            return plots.reliability(fast.iloc[-1]["bins"] if len(fast) and "bins" in fast else None)
        # the scores: by the fast tier's version (_likes may load it from the database: the key after that)
        liked = [gr.skip()] * 3
        likes_key = (studio.completion_count(), studio.reward_status()["fast_version"])
        if blind_view(studio, request):       # reward scores of completions: never sent in blind mode
            likes_key = None
        elif sent_.get("likes") != likes_key:
            best_, worst_, scores = _likes(studio)
            liked = [plots.score_histogram(scores), best_, worst_]
            likes_key = (likes_key[0], studio.reward_status()["fast_version"])
        now["likes"] = likes_key
        metrics_key = (len(m), int(m["version"].max()) if len(m) else None)
        return [*unless_sent(sent_, now, "status", _status_md(studio, m)),
                *unless_sent(sent_, now, "curves", metrics_key, lambda _: plots.reward_curves(m)),
                *unless_sent(sent_, now, "calibration", metrics_key, calibration), liked[0],
                *unless_sent(sent_, now, "versions", (len(vers), int(vers["id"].max()) if len(vers) else None),
                             lambda _: versions_table(vers)),
                liked[1], liked[2], now]

    outputs = [status, curves, calib, hist, versions, best, worst, sent]

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
            studio.set_deep_every(k)
            studio.train_reward_model(tier="deep", wait=False)
            return ok("deep tier training started in the background")
        except StudioError as e:
            return fail(e)

    def on_every(k, request: gr.Request):
        try:
            require_owner(studio, request, "change reward-model settings")
        except StudioError as e:
            return fail(e)
        return ok(f"deep tier updates every {studio.set_deep_every(k)} new pairs")

    def on_import(f, fmt_, request: gr.Request):
        try:
            n = studio.import_preferences(owner_upload(studio, request, f, "import data"), format=fmt_)
        except StudioError as e:
            return fail(e)
        return ok(f"imported {n} pairs; reward features are being computed in the background")

    def on_export(version, folder, request: gr.Request):
        try:
            require_owner(studio, request, "export the reward model")
            if version is None:
                raise StudioError("give the id of the version to export")
            m = studio.app_export_reward_model(int(version), str(folder or "").strip())
        except StudioError as e:
            return fail(e)
        return ok(f"version {m['version']} ({m['tier']}) written to {m['path']}: {m['heldout_pairs_ranked_alike']}"
                  f"/{m['heldout_pairs']} held-out pairs ranked as here, largest score difference "
                  f"{m['heldout_max_abs_diff']:.2g}")

    def on_select(evt: gr.SelectData, df, request: gr.Request):
        """Pin the selected version for PPO launches from this browser tab (not the whole process: another
        session, or the notebook API, keeps its own choice)."""
        try:
            require_owner(studio, request, "choose the reward model for training")
        except StudioError as e:
            return gr.skip(), fail(e)
        try:
            row = df.iloc[evt.index[0]]
            vid = int(row["id"])
        except Exception:
            return gr.skip(), gr.skip()
        if str(row.get(PPO_COLUMN, "yes")) != "yes":
            return gr.skip(), fail(f"version {vid} kept its metrics only, no weights (automatic refits store them "
                                   "now and then), so PPO cannot use it: pick a version marked 'yes', or press "
                                   "'Refit fast tier now' for one")
        return {"version": vid, "tier": str(row.get("tier", "")) or None}, gr.skip()

    def pin_md(p):
        from .train import pin_of
        vid = pin_of(p)
        if vid is None:
            return "PPO uses the latest version of the tier chosen in the Train tab (select a row to pin one)."
        return ok(f"PPO launches from this browser tab will use version {vid} (pinned; the Train tab's "
                  "'Use the latest version instead' undoes it).")

    refit.click(on_refit, None, action, api_name="refit_fast").then(refresh, sent, outputs)
    train_deep.click(on_deep, [every], action, api_name="train_deep")
    every.submit(on_every, [every], action, api_name="deep_every")
    import_btn.click(on_import, [upload, fmt], action, api_name="import_preferences").then(refresh, sent, outputs)
    export_btn.click(on_export, [export_version, export_dir], action, api_name="export_reward_model")
    versions.select(on_select, [versions], [pinned, use_version])
    pinned.change(pin_md, pinned, use_version, show_progress="hidden", api_visibility="private")
    # timer-driven: no "processing" overlay over the status every 3 s
    timer.tick(refresh, sent, outputs, api_visibility="private", show_progress="hidden")
    return dict(on_load=(refresh, sent, outputs), owner_only=owner_only, pinned=pinned,
                blind_hidden=[hist_row, liked_row])
