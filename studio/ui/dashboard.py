"""Dashboard tab: labels over time, star distribution, coverage, reward model vs stars, inter-annotator
agreement, policy leaderboard; plus (owner) training-data export and rated-completions import."""
from __future__ import annotations

import math
import time

import gradio as gr

from .. import dashboards as dash
from ..auth import require_owner
from ..errors import StudioError
from .common import blind_view, fail, ok, owner_upload

ALL = "(all criteria)"


def _criteria(studio) -> list[str]:
    try:
        return [ALL] + [str(n) for n in studio.criteria()["name"]]
    except Exception:
        return [ALL, "overall"]


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def build(studio, role: str = "owner"):
    owner = role == "owner"
    with gr.Row():
        crit = gr.Dropdown(_criteria(studio), value="overall", label="Criterion", elem_id="dash-criterion",
                           allow_custom_value=True)
        with gr.Column(min_width=160) as blind_box:
            blind = gr.Checkbox(label="Leaderboard: Blind-compare prompts only", elem_id="dash-blind")
        refresh = gr.Button("Refresh", elem_id="dash-refresh")
    summary = gr.Markdown(elem_id="dash-summary")
    with gr.Row():
        over_time = gr.Plot(label="Labels over time", elem_id="dash-over-time")
    with gr.Row():
        stars = gr.Plot(label="Star distribution", elem_id="dash-stars")
        cover = gr.Plot(label="Coverage", elem_id="dash-coverage")
    with gr.Row():
        with gr.Column() as rvs_box:
            rvs = gr.Plot(label="Reward model vs stars", elem_id="dash-reward-vs-stars")
        agree = gr.Plot(label="Agreement", elem_id="dash-agreement")
    with gr.Row() as board_row:
        board = gr.Plot(label="Policy leaderboard", elem_id="dash-leaderboard")
    with gr.Row():
        with gr.Column() as board_box:
            board_table = gr.Dataframe(label="Leaderboard", interactive=False, elem_id="dash-leaderboard-table")
        kappa_table = gr.Dataframe(label="Cohen's kappa per annotator pair (stars)", interactive=False,
                                   elem_id="dash-kappa-table")

    with gr.Accordion("Export training data", open=False, visible=owner) as export_box:
        with gr.Row():
            kind = gr.Dropdown([("Preference pairs (prompt/chosen/rejected)", "preference"),
                                ("Unpaired (prompt/completion/label, KTO)", "unpaired"),
                                ("SFT (prompt/completion)", "sft"), ("Raw tables (zip)", "raw")],
                               value="preference", label="What", elem_id="export-kind")
            fmt = gr.Radio(["parquet", "jsonl", "csv"], value="parquet", label="File format",
                           elem_id="export-format")
            conv = gr.Checkbox(label="Conversational (role/content messages)", elem_id="export-conversational")
            export_btn = gr.Button("Export", elem_id="export-data-btn")
        export_msg = gr.Markdown(elem_id="export-msg")
        export_file = gr.File(label="Download", interactive=False, elem_id="export-file")
    with gr.Accordion("Import rated completions (UltraFeedback-like)", open=False, visible=owner) as import_box:
        gr.Markdown('One row per prompt: `{"prompt": ..., "completions": [{"text": ..., "score": ...}, ...]}` '
                    "(JSONL or Parquet). Scores 1..5 are kept, 0..10 are halved (rounded half up).")
        with gr.Row():
            upload = gr.File(label="JSONL(.gz) or Parquet", file_types=[".jsonl", ".gz", ".json", ".parquet"],
                             elem_id="rated-file")
            scale = gr.Radio([("Detect", "auto"), ("1..5", "5"), ("0..10", "10")], value="auto", label="Score scale",
                             elem_id="rated-scale")
            import_btn = gr.Button("Import", elem_id="rated-import-btn")
        import_msg = gr.Markdown(elem_id="rated-import-msg")

    def load(crit_, blind_, request: gr.Request = None):
        criterion = None if crit_ in (None, "", ALL) else crit_
        hide = blind_view(studio, request)    # blind mode: no leaderboard of policies, no reward scores
        try:
            d = studio.dashboard(criterion, bool(blind_), hide_policies=hide)
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

    def on_export(kind_, fmt_, conv_, crit_, request: gr.Request):
        try:
            require_owner(studio, request, "export data")
        except StudioError as e:
            return fail(e), None
        criterion = None if crit_ in (None, "", ALL) else crit_
        try:
            opts = {} if kind_ == "raw" else dict(conversational=bool(conv_), criterion=criterion)
            n, path = studio.export_download(kind_, fmt_, **opts)
        except StudioError as e:
            return fail(e), None
        return ok(f"exported {n:,} rows"), path     # removed by the studio once served

    def on_import(f, scale_, crit_, request: gr.Request):
        criterion = "overall" if crit_ in (None, "", ALL) else crit_
        try:
            # features of the new completions, then a fast-tier refit, start in the background
            r = studio.import_rated(owner_upload(studio, request, f, "import data"), criterion=criterion,
                                    scale=scale_)
        except StudioError as e:
            return fail(e)
        return ok(f"imported {r['completions']} completions with {r['labels']} star labels for {r['prompts']} prompts "
                  f"(scale {r['scale']}, source {r['source']}; {r['skipped']} skipped as already imported)")

    inputs = [crit, blind]
    outputs = [summary, over_time, stars, cover, rvs, agree, board, board_table, kappa_table]
    refresh.click(load, inputs, outputs)
    crit.change(load, inputs, outputs)
    blind.change(load, inputs, outputs)
    export_btn.click(on_export, [kind, fmt, conv, crit], [export_msg, export_file], api_name="export_data")
    import_btn.click(on_import, [upload, scale, crit], import_msg, api_name="import_rated").then(load, inputs, outputs)
    return dict(on_load=(load, inputs, outputs), owner_only=[export_box, import_box],
                blind_hidden=[blind_box, rvs_box, board_row, board_box])
