"""Reward model tab: both tiers' current versions, live curves, versions, calibration, likes and dislikes,
importing preference data and exporting a version. Handlers first (functions of the studio, plain values and
the caller's request), then the layout with the events wired at the bottom."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import numpy as np
import pandas as pd

from .. import plots
from ..errors import StudioError
from ..auth import require_owner
from .common import bind, blind_view, fail, md_text, ok, owner_upload, unless_sent
from .train_actions import pin_of


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


# the refresh's outputs, in order (build lists the components the same way)
REFRESH_OUTPUTS = ["status", "curves", "calibration", "hist", "versions", "best", "worst", "sent"]


def _liked(studio, sent: dict, now: dict, request) -> list:
    """[score histogram, liked most, liked least], rebuilt only when the completions or the fast tier's version
    changed since `sent`; never sent in blind mode (reward scores of completions)."""
    liked = [gr.skip()] * 3
    likes_key = (studio.completion_count(), studio.reward_status()["fast_version"])
    if blind_view(studio, request):
        likes_key = None
    elif sent.get("likes") != likes_key:
        best, worst, scores = _likes(studio)
        liked = [plots.score_histogram(scores), best, worst]
        # _likes may have loaded the fast tier from the database: its version is known now
        likes_key = (likes_key[0], studio.reward_status()["fast_version"])
    now["likes"] = likes_key
    return liked


def refresh(studio, sent=None, request: gr.Request = None) -> list:
    """The REFRESH_OUTPUTS: every 3 s while the tab is open, and after a refit or an import; only what changed
    since this browser tab was last sent (`sent`) is rebuilt and sent (each tick used to rescore every
    completion and redraw four plots)."""
    sent, now = sent or {}, {}
    m = studio.reward_metrics()
    vers = studio.reward_versions()

    def calibration(_):
        fast = m[m["tier"] == "fast"].sort_values("version") if len(m) else m
        return plots.reliability(fast.iloc[-1]["bins"] if len(fast) and "bins" in fast else None)
    liked = _liked(studio, sent, now, request)
    metrics_key = (len(m), int(m["version"].max()) if len(m) else None)
    return [*unless_sent(sent, now, "status", _status_md(studio, m)),
            *unless_sent(sent, now, "curves", metrics_key, lambda _: plots.reward_curves(m)),
            *unless_sent(sent, now, "calibration", metrics_key, calibration), liked[0],
            *unless_sent(sent, now, "versions", (len(vers), int(vers["id"].max()) if len(vers) else None),
                         lambda _: versions_table(vers)),
            liked[1], liked[2], now]


def on_refit(studio, request: gr.Request = None) -> str:
    try:
        require_owner(studio, request, "train the reward model")
        v = studio.train_reward_model(tier="fast")
        return ok(f"fast tier refit: version {v}")
    except StudioError as e:
        return fail(e)


def on_deep(studio, k, request: gr.Request = None) -> str:
    """Train the deep tier now (in the background), with its update period set to k new pairs."""
    try:
        require_owner(studio, request, "train the reward model")
        studio.set_deep_every(k)
        studio.train_reward_model(tier="deep", wait=False)
        return ok("deep tier training started in the background")
    except StudioError as e:
        return fail(e)


def on_every(studio, k, request: gr.Request = None) -> str:
    try:
        require_owner(studio, request, "change reward-model settings")
    except StudioError as e:
        return fail(e)
    return ok(f"deep tier updates every {studio.set_deep_every(k)} new pairs")


def on_import(studio, f, fmt, request: gr.Request = None) -> str:
    """Preference pairs from a file (fmt "hh" or "trl")."""
    try:
        n = studio.import_preferences(owner_upload(studio, request, f, "import data"), format=fmt)
    except StudioError as e:
        return fail(e)
    return ok(f"imported {n} pairs; reward features are being computed in the background")


def on_export(studio, version, folder, request: gr.Request = None) -> str:
    """A version as a sequence-classification model in a new folder of the export folder."""
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


def on_select(studio, evt: gr.SelectData, df, request: gr.Request = None) -> tuple:
    """(pin, message): pin the selected version for PPO launches from this browser tab (not the whole process:
    another session, or the notebook API, keeps its own choice)."""
    try:
        require_owner(studio, request, "choose the reward model for training")
    except StudioError as e:
        return gr.skip(), fail(e)
    try:
        # the clicked row as the page showed it: the table's value may have been refreshed (a new version on
        # top) between what the user saw and the event, which shifts the row index by one
        shown = getattr(evt, "row_value", None)
        row = (pd.Series(shown, index=df.columns) if shown is not None and len(shown) == len(df.columns)
               else df.iloc[evt.index[0]])
        vid = int(row["id"])
    except Exception:
        return gr.skip(), gr.skip()
    if str(row.get(PPO_COLUMN, "yes")) != "yes":
        return gr.skip(), fail(f"version {vid} kept its metrics only, no weights (automatic refits store them "
                               "now and then), so PPO cannot use it: pick a version marked 'yes', or press "
                               "'Refit fast tier now' for one")
    return {"version": vid, "tier": str(row.get("tier", "")) or None}, gr.skip()


def pin_md(pinned) -> str:
    """The line under the versions table: which version PPO launches from this browser tab use."""
    vid = pin_of(pinned)
    if vid is None:
        return "PPO uses the latest version of the tier chosen in the Train tab (select a row to pin one)."
    return ok(f"PPO launches from this browser tab will use version {vid} (pinned; the Train tab's "
              "'Use the latest version instead' undoes it).")


# ------------------------------------------------------------------------------------------------ layout
def _owner_boxes(ui) -> None:
    """(owners) Importing preference pairs and exporting a version."""
    with gr.Accordion("Import preference pairs (HH-RLHF or TRL prompt/chosen/rejected)", open=False,
                      visible=ui.owner) as ui.import_box:
        ui.upload = gr.File(label="JSONL(.gz) or Parquet", file_types=[".jsonl", ".gz", ".json", ".parquet"],
                            elem_id="pref-file")
        ui.fmt = gr.Radio([("HH-RLHF", "hh"), ("TRL", "trl")], value="hh", label="Format")
        ui.import_btn = gr.Button("Import", elem_id="pref-import-btn")
    with gr.Accordion("Export a version for TRL / OpenRLHF / verl (AutoModelForSequenceClassification)",
                      open=False, visible=ui.owner) as ui.export_box:
        with gr.Row():
            ui.export_version = gr.Number(label="Version id (a row of the table)", precision=0,
                                          elem_id="reward-export-version")
            ui.export_dir = gr.Textbox(label="New folder in the export folder", value="reward-model",
                                       elem_id="reward-export-dir")
        ui.export_btn = gr.Button("Export reward model", elem_id="reward-export-btn")


def build(studio, role: str = "owner"):
    ui = SimpleNamespace(owner=role == "owner")
    ui.status = gr.Markdown(elem_id="reward-status")
    with gr.Row(visible=ui.owner) as owner_row:
        refit = gr.Button("Refit fast tier now", elem_id="refit-fast-btn")
        train_deep = gr.Button("Train deep tier now", elem_id="train-deep-btn")
        every = gr.Number(value=studio.reward_status()["deep_every"], precision=0, label="Deep update every K new "
                          "pairs (0 = only on demand)", elem_id="deep-every")
    action = gr.Markdown(elem_id="reward-action")
    with gr.Row():
        ui.curves = gr.Plot(label="Accuracy and loss", elem_id="reward-curves")
        ui.calibration = gr.Plot(label="Calibration", elem_id="reward-calibration")
    with gr.Row() as hist_row:
        ui.hist = gr.Plot(label="Scores", elem_id="reward-hist")
    ui.versions = gr.Dataframe(label="Versions (select a row to pin it for PPO launches from this browser tab)",
                               interactive=False, elem_id="reward-versions")
    use_version = gr.Markdown(elem_id="reward-pin")
    # the version chosen for PPO belongs to this browser tab (the Train tab reads it, shows it and can drop it)
    pinned = gr.State(None)
    with gr.Row() as liked_row:
        ui.best = gr.Dataframe(label="Liked most", interactive=False, wrap=True, elem_id="reward-liked-most")
        ui.worst = gr.Dataframe(label="Liked least", interactive=False, wrap=True, elem_id="reward-liked-least")
    _owner_boxes(ui)
    # Gradio ticks it only while this tab is open; `sent`: what this browser tab was last sent
    timer = gr.Timer(3.0)
    ui.sent = gr.State(None)

    # ------------------------------------------------------------------------------------------- events
    outputs = [getattr(ui, name) for name in REFRESH_OUTPUTS]
    update = bind(refresh, studio)      # one function for every event that refreshes (tests find it by name)
    refit.click(bind(on_refit, studio), None, action, api_name="refit_fast").then(update, ui.sent, outputs)
    train_deep.click(bind(on_deep, studio), [every], action, api_name="train_deep")
    every.submit(bind(on_every, studio), [every], action, api_name="deep_every")
    ui.import_btn.click(bind(on_import, studio), [ui.upload, ui.fmt], action, api_name="import_preferences").then(
        update, ui.sent, outputs)
    ui.export_btn.click(bind(on_export, studio), [ui.export_version, ui.export_dir], action,
                        api_name="export_reward_model")
    ui.versions.select(bind(on_select, studio), [ui.versions], [pinned, use_version])
    pinned.change(pin_md, pinned, use_version, show_progress="hidden", api_visibility="private")
    # timer-driven: no "processing" overlay over the status every 3 s
    timer.tick(update, ui.sent, outputs, api_visibility="private", show_progress="hidden")
    return dict(on_load=(update, ui.sent, outputs), owner_only=[owner_row, ui.import_box, ui.export_box],
                pinned=pinned, blind_hidden=[hist_row, liked_row])
