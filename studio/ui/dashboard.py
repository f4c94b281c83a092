"""Dashboard tab: labels over time, star distribution, coverage, reward model vs stars, inter-annotator
agreement, policy leaderboard; plus (owner) training-data export and rated-completions import."""
from __future__ import annotations

import math
import time

import gradio as gr
import pandas as pd

from storage import exports as q

from .. import dashboards as dash
from .. import exports as ex
from ..auth import require_owner
from ..errors import StudioError
from .common import fail, ok, owner_upload

ALL = "(all criteria)"
_SCORED_MAX = 1000  # completions scored for the reward-vs-stars plot (those with cached reward features)


def _criteria(studio) -> list[str]:
    try:
        return [ALL] + [str(n) for n in studio.criteria()["name"]]
    except Exception:
        return [ALL, "overall"]


def _scores(studio, criterion) -> pd.DataFrame:
    """Reward scores of recently star-rated completions whose reward features are cached (never runs the model
    on new texts here: that is the Reward tab's background job)."""
    empty = pd.DataFrame({"id": pd.Series([], dtype="int64"), "score": pd.Series([], dtype="float64")})
    rew = getattr(studio, "reward", None)
    if rew is None or not hasattr(rew, "visible_scores"):
        return empty
    try:
        ids = q.rated_completion_ids(studio.store, criterion, limit=_SCORED_MAX)
        have = studio.store.get_features(rew.revision, ids) if ids else {}
        ids = [i for i in ids if i in have]
        if not ids:
            return empty
        res = rew.visible_scores(ids)
    except Exception:
        return empty
    rows = [(i, s[0]) for i, s in zip(ids, res) if s is not None and not math.isnan(s[0])]
    return pd.DataFrame(rows, columns=["id", "score"]) if rows else empty


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def build(studio, role: str = "owner"):
    owner = role == "owner"
    with gr.Row():
        crit = gr.Dropdown(_criteria(studio), value="overall", label="Criterion", elem_id="dash-criterion",
                           allow_custom_value=True)
        blind = gr.Checkbox(label="Leaderboard: Blind-compare prompts only", elem_id="dash-blind")
        refresh = gr.Button("Refresh", elem_id="dash-refresh")
    summary = gr.Markdown(elem_id="dash-summary")
    with gr.Row():
        over_time = gr.Plot(label="Labels over time", elem_id="dash-over-time")
    with gr.Row():
        stars = gr.Plot(label="Star distribution", elem_id="dash-stars")
        cover = gr.Plot(label="Coverage", elem_id="dash-coverage")
    with gr.Row():
        rvs = gr.Plot(label="Reward model vs stars", elem_id="dash-reward-vs-stars")
        agree = gr.Plot(label="Agreement", elem_id="dash-agreement")
    with gr.Row():
        board = gr.Plot(label="Policy leaderboard", elem_id="dash-leaderboard")
    with gr.Row():
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

    def load(crit_, blind_):
        criterion = None if crit_ in (None, "", ALL) else crit_
        st = studio.store
        t0 = time.perf_counter()
        try:
            agg = dash.agreement_stats(st, criterion)
            table = dash.leaderboard_table(st, criterion, bool(blind_))
            figs = [dash.labels_over_time(st), dash.star_distribution(st, criterion), dash.coverage(st),
                    dash.reward_vs_stars(st, _scores(studio, criterion), criterion),
                    dash.agreement(st, criterion, stats=agg), dash.leaderboard(st, table=table)]
        except Exception as e:  # a dashboard must never take the tab down
            empty = dash._empty("Dashboard", f"failed: {e}")
            return [fail(f"dashboards failed: {e}")] + [empty] * 6 + [None, None]
        n = st.stats()
        md = (f"{n['prompts']:,} prompts · {n['completions']:,} completions · {n['feedback']:,} labels given (replaced and withdrawn ones too) · "
              f"stars α (ordinal) {_fmt(agg['stars_alpha_ordinal'])} · pairwise agreement "
              f"{_fmt(agg['pairwise_agreement'])} · built in {(time.perf_counter() - t0) * 1000:.0f} ms")
        show = table.round({"rating": 0, "ci_low": 0, "ci_high": 0, "theta": 3, "se": 3, "win_rate": 3})
        kap = agg["kappa"].head(50).round({"kappa": 3, "kappa_quadratic": 3, "exact_agreement": 3})
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
            r = ex.import_rated(studio.store, owner_upload(studio, request, f, "import data"), criterion=criterion,
                                scale=scale_)
        except StudioError as e:
            return fail(e)
        rew = getattr(studio, "reward", None)
        if rew is not None and r["completions"]:
            try:
                rew.start_feature_job()  # features of the new completions, then a fast-tier refit
            except Exception:
                pass
        return ok(f"imported {r['completions']} completions with {r['labels']} star labels for {r['prompts']} prompts "
                  f"(scale {r['scale']}, source {r['source']}; {r['skipped']} skipped as already imported)")

    inputs = [crit, blind]
    outputs = [summary, over_time, stars, cover, rvs, agree, board, board_table, kappa_table]
    refresh.click(load, inputs, outputs)
    crit.change(load, inputs, outputs)
    blind.change(load, inputs, outputs)
    export_btn.click(on_export, [kind, fmt, conv, crit], [export_msg, export_file], api_name="export_data")
    import_btn.click(on_import, [upload, scale, crit], import_msg, api_name="import_rated").then(load, inputs, outputs)
    return dict(on_load=(load, inputs, outputs), owner_only=[export_box, import_box])
