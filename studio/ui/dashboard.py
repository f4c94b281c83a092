"""Dashboard tab: labels over time, star distribution, coverage, reward model vs stars, inter-annotator
agreement, policy leaderboard; plus (owner) training-data export and rated-completions import. Handlers first
(functions of the studio, plain values and the caller's request), then the layout, events wired at the bottom."""
from __future__ import annotations

import math
from types import SimpleNamespace

import gradio as gr

from .. import dashboards as dash
from ..auth import require_owner
from ..errors import StudioError
from .common import bind, blind_view, fail, ok, owner_upload

ALL = "(all criteria)"


def _criteria(studio) -> list[str]:
    try:
        return [ALL] + [str(n) for n in studio.criteria()["name"]]
    except Exception:
        return [ALL, "overall"]


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _criterion(crit) -> str | None:
    return None if crit in (None, "", ALL) else crit


def load(studio, crit, blind_only, request: gr.Request = None) -> list:
    """[summary, six figures, leaderboard table, kappa table] for a criterion (ALL: every one); blind_only: the
    leaderboard from Blind-compare prompts only. In blind mode no leaderboard of policies for annotators."""
    hide = blind_view(studio, request)    # blind mode: no leaderboard of policies, no reward scores
    try:
        d = studio.dashboard(_criterion(crit), bool(blind_only), hide_policies=hide)
    except Exception as e:  # a dashboard must never take the tab down
        empty = dash.empty_figure("Dashboard", dash.plot_text(f"failed: {e}"))
        return [fail(f"dashboards failed: {e}")] + [empty] * 6 + [None, None]
    n, agg = d["stats"], d["agreement_stats"]
    md = (f"{n['prompts']:,} prompts · {n['completions']:,} completions · {n['feedback']:,} labels given "
          f"(replaced and withdrawn ones too) · stars α (ordinal) {_fmt(agg['stars_alpha_ordinal'])} · "
          f"pairwise agreement {_fmt(agg['pairwise_agreement'])} · built in {d['seconds'] * 1000:.0f} ms")
    figs = [d[k] for k in ("labels_over_time", "star_distribution", "coverage", "reward_vs_stars", "agreement",
                           "leaderboard")]
    table = d["leaderboard_table"]
    show = None if hide else table.round({"rating": 0, "ci_low": 0, "ci_high": 0, "theta": 3, "se": 3,
                                          "win_rate": 3})
    kap = d["kappa"].head(50).round({"kappa": 3, "kappa_quadratic": 3, "exact_agreement": 3})
    return [md] + figs + [show, kap]


def on_export(studio, kind, fmt, conversational, crit, request: gr.Request = None) -> tuple:
    """(message, file to download): training data of one kind in a file format (owners)."""
    try:
        require_owner(studio, request, "export data")
        opts = {} if kind == "raw" else dict(conversational=bool(conversational), criterion=_criterion(crit))
        n, path = studio.export_download(kind, fmt, **opts)
    except StudioError as e:
        return fail(e), None
    return ok(f"exported {n:,} rows"), path     # removed by the studio once served


def on_import(studio, f, scale, crit, request: gr.Request = None) -> str:
    """Rated completions (UltraFeedback-like) as star labels for the criterion shown ("overall" for ALL)."""
    try:
        # features of the new completions, then a fast-tier refit, start in the background
        r = studio.import_rated(owner_upload(studio, request, f, "import data"), criterion=_criterion(crit) or
                                "overall", scale=scale)
    except StudioError as e:
        return fail(e)
    return ok(f"imported {r['completions']} completions with {r['labels']} star labels for {r['prompts']} prompts "
              f"(scale {r['scale']}, source {r['source']}; {r['skipped']} skipped as already imported)")


# ------------------------------------------------------------------------------------------------ layout
def _plots(ui) -> None:
    ui.summary = gr.Markdown(elem_id="dash-summary")
    with gr.Row():
        ui.over_time = gr.Plot(label="Labels over time", elem_id="dash-over-time")
    with gr.Row():
        ui.stars = gr.Plot(label="Star distribution", elem_id="dash-stars")
        ui.cover = gr.Plot(label="Coverage", elem_id="dash-coverage")
    with gr.Row():
        with gr.Column() as ui.rvs_box:
            ui.rvs = gr.Plot(label="Reward model vs stars", elem_id="dash-reward-vs-stars")
        ui.agree = gr.Plot(label="Agreement", elem_id="dash-agreement")
    with gr.Row() as ui.board_row:
        ui.board = gr.Plot(label="Policy leaderboard", elem_id="dash-leaderboard")
    with gr.Row():
        with gr.Column() as ui.board_box:
            ui.board_table = gr.Dataframe(label="Leaderboard", interactive=False, elem_id="dash-leaderboard-table")
        ui.kappa_table = gr.Dataframe(label="Cohen's kappa per annotator pair (stars)", interactive=False,
                                      elem_id="dash-kappa-table")


def _export_box(ui, owner: bool) -> None:
    with gr.Accordion("Export training data", open=False, visible=owner) as ui.export_box:
        with gr.Row():
            ui.kind = gr.Dropdown([("Preference pairs (prompt/chosen/rejected)", "preference"),
                                   ("Unpaired (prompt/completion/label, KTO)", "unpaired"),
                                   ("SFT (prompt/completion)", "sft"), ("Raw tables (zip)", "raw")],
                                  value="preference", label="What", elem_id="export-kind")
            ui.fmt = gr.Radio(["parquet", "jsonl", "csv"], value="parquet", label="File format",
                              elem_id="export-format")
            ui.conv = gr.Checkbox(label="Conversational (role/content messages)", elem_id="export-conversational")
            ui.export_btn = gr.Button("Export", elem_id="export-data-btn")
        ui.export_msg = gr.Markdown(elem_id="export-msg")
        ui.export_file = gr.File(label="Download", interactive=False, elem_id="export-file")


def _import_box(ui, owner: bool) -> None:
    with gr.Accordion("Import rated completions (UltraFeedback-like)", open=False, visible=owner) as ui.import_box:
        gr.Markdown('One row per prompt: `{"prompt": ..., "completions": [{"text": ..., "score": ...}, ...]}` '
                    "(JSONL or Parquet). Scores 1..5 are kept, 0..10 are halved (rounded half up).")
        with gr.Row():
            ui.upload = gr.File(label="JSONL(.gz) or Parquet", file_types=[".jsonl", ".gz", ".json", ".parquet"],
                                elem_id="rated-file")
            ui.scale = gr.Radio([("Detect", "auto"), ("1..5", "5"), ("0..10", "10")], value="auto",
                                label="Score scale", elem_id="rated-scale")
            ui.import_btn = gr.Button("Import", elem_id="rated-import-btn")
        ui.import_msg = gr.Markdown(elem_id="rated-import-msg")


def build(studio, role: str = "owner"):
    owner = role == "owner"
    ui = SimpleNamespace()
    with gr.Row():
        ui.crit = gr.Dropdown(_criteria(studio), value="overall", label="Criterion", elem_id="dash-criterion",
                              allow_custom_value=True)
        with gr.Column(min_width=160) as blind_box:
            ui.blind = gr.Checkbox(label="Leaderboard: Blind-compare prompts only", elem_id="dash-blind")
        refresh = gr.Button("Refresh", elem_id="dash-refresh")
    _plots(ui)
    _export_box(ui, owner)
    _import_box(ui, owner)

    # ------------------------------------------------------------------------------------------- events
    show = bind(load, studio)
    inputs = [ui.crit, ui.blind]
    outputs = [ui.summary, ui.over_time, ui.stars, ui.cover, ui.rvs, ui.agree, ui.board, ui.board_table,
               ui.kappa_table]
    refresh.click(show, inputs, outputs)
    ui.crit.change(show, inputs, outputs)
    ui.blind.change(show, inputs, outputs)
    ui.export_btn.click(bind(on_export, studio), [ui.kind, ui.fmt, ui.conv, ui.crit], [ui.export_msg, ui.export_file],
                        api_name="export_data")
    ui.import_btn.click(bind(on_import, studio), [ui.upload, ui.scale, ui.crit], ui.import_msg,
                        api_name="import_rated").then(show, inputs, outputs)
    return dict(on_load=(show, inputs, outputs), owner_only=[ui.export_box, ui.import_box],
                blind_hidden=[blind_box, ui.rvs_box, ui.board_row, ui.board_box])
