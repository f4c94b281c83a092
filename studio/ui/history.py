"""History tab: prompts, completions and labels, filterable."""
from __future__ import annotations

import gradio as gr

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


def build(studio, role: str = "owner"):
    with gr.Row():
        kind = gr.Dropdown(KINDS, value="all", label="Label kind", elem_id="history-kind")
        annotator = gr.Textbox(label="Annotator", elem_id="history-annotator")
        search = gr.Textbox(label="Text contains", elem_id="history-search")
        replaced = gr.Checkbox(label="Include replaced labels (history)", elem_id="history-replaced")
        refresh = gr.Button("Refresh", elem_id="history-refresh")
    summary = gr.Markdown(elem_id="history-summary")
    with gr.Tab("Labels"):
        labels = gr.Dataframe(elem_id="history-labels", interactive=False, wrap=True)
    with gr.Tab("Completions"):
        completions = gr.Dataframe(elem_id="history-completions", interactive=False, wrap=True)
    with gr.Tab("Prompts"):
        prompts = gr.Dataframe(elem_id="history-prompts", interactive=False, wrap=True)

    def load(kind_, annotator_, search_, replaced_):
        fb = studio.feedback(history=bool(replaced_))
        if kind_ and kind_ != "all":
            fb = fb[fb["kind"] == kind_]
        if annotator_:
            fb = fb[fb["annotator"].astype(str).str.contains(annotator_.strip(), case=False, regex=False)]
        fb = _filter_text(fb, search_, ["text", "tags", "winner"])
        cs = _filter_text(studio.completions(), search_, ["text"])
        ps = _filter_text(studio.prompts(), search_, ["text"])
        md = f"{len(ps)} prompts · {len(cs)} completions · {len(fb)} labels shown"
        return (md, fb.tail(_MAX_ROWS).iloc[::-1], cs.drop(columns=["params"], errors="ignore").tail(_MAX_ROWS).iloc[::-1],
                ps.tail(_MAX_ROWS).iloc[::-1])

    inputs = [kind, annotator, search, replaced]
    outputs = [summary, labels, completions, prompts]
    refresh.click(load, inputs, outputs)
    for c in (kind, replaced):
        c.change(load, inputs, outputs)
    search.submit(load, inputs, outputs)
    annotator.submit(load, inputs, outputs)
    return dict(on_load=(load, inputs, outputs))
