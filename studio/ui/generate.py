"""Generate & Rate tab: a prompt, N streamed completions side by side, and all six kinds of feedback. The layout
is here with the events wired at the bottom of build(); the handlers are in generate_actions.py."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from rlhf_studio.components.generation import MAX_N
from . import generate_actions as act
from .common import LETTERS, bind
# the tab's helpers, under the names other modules and the tests use
from .generate_actions import (BLIND_SCORE, generated_message, label_key_for, new_label_key, parse_seed,  # noqa: F401
                               ranking_order, rubric_md, suggestion_view)

WINNER_CHOICES = [("A wins", "a"), ("B wins", "b"), ("Tie", "tie"), ("Both bad", "both_bad")]


def _prompt_area(ui, role: str) -> None:
    """The prompt, the library, and (owners) adding prompts and criteria."""
    with gr.Row():
        with gr.Column(scale=3):
            ui.prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                   placeholder="Ask the model something, or press 'Next prompt'")
        with gr.Column(scale=1, min_width=220):
            ui.next_btn = gr.Button("Next prompt (n)", elem_id="next-prompt-btn")
            ui.library = gr.Dropdown(label="Prompt library (fewest labels first)", choices=[], elem_id="library",
                                     allow_custom_value=False)
            ui.load_btn = gr.Button("Load its completions", size="sm", elem_id="load-prompt-btn")
            ui.starter_btn = gr.Button("Load starter prompts", size="sm", visible=False,
                                       elem_id="starter-prompts-btn")
    with gr.Accordion("Add prompts to the library", open=False, visible=role == "owner") as ui.prompts_box:
        with gr.Row():
            ui.new_prompts = gr.Textbox(label="One prompt per line", lines=3, elem_id="new-prompts", scale=3)
            ui.add_btn = gr.Button("Add", elem_id="add-prompts-btn")
            ui.prompt_file = gr.File(label="or import .txt / .jsonl / .csv / .parquet", elem_id="prompt-file",
                                     file_types=[".txt", ".jsonl", ".csv", ".parquet"])
            ui.import_btn = gr.Button("Import file", elem_id="import-prompts-btn")
    with gr.Accordion("Criteria annotators judge by", open=False, visible=role == "owner") as ui.criteria_box:
        with gr.Row():
            ui.crit_name = gr.Textbox(label="Name (e.g. helpfulness)", elem_id="new-criterion", max_lines=1)
            ui.crit_desc = gr.Textbox(label="What it asks (shown as the rubric)", elem_id="new-criterion-desc",
                                      max_lines=1, scale=3)
            ui.crit_btn = gr.Button("Add or redescribe", elem_id="add-criterion-btn")


def _settings(ui) -> None:
    """Sampling settings, the policy, Generate / Stop, the criterion and Undo, the rubric and the status line."""
    with gr.Row():
        ui.n = gr.Slider(1, MAX_N, value=4, step=1, label="Completions (n)", elem_id="n")
        ui.max_new = gr.Slider(8, 512, value=64, step=8, label="Max new tokens", elem_id="max-new-tokens")
        ui.temperature = gr.Slider(0, 2, value=0.8, step=0.05, label="Temperature (0 = greedy)",
                                   elem_id="temperature")
        ui.top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="Top-p", elem_id="top-p")
        ui.seed = gr.Textbox(value="", label="Seed (empty = random)", elem_id="seed", max_lines=1)
        ui.adapter = gr.Dropdown(label="Policy", choices=["base"], value="base", elem_id="adapter")
    with gr.Row():
        ui.gen_btn = gr.Button("Generate (g)", variant="primary", elem_id="generate-btn")
        ui.stop_btn = gr.Button("Stop", elem_id="stop-btn")
        ui.criterion = gr.Dropdown(label="Criterion", choices=["overall"], value="overall", elem_id="criterion")
        ui.undo_btn = gr.Button("Undo my last label (z)", elem_id="undo-btn")
    ui.rubric = gr.Markdown(elem_id="rubric")
    ui.status = gr.Markdown(elem_id="status")


def _cards(ui, studio) -> None:
    """MAX_N cards (4 shown at first): text, reward line, stars, thumbs and thumbs-down reasons."""
    ui.cols, ui.texts, ui.scores, ui.stars, ui.ups, ui.downs, ui.tags = [], [], [], [], [], [], []
    with gr.Row(equal_height=False):
        for i in range(MAX_N):
            with gr.Column(visible=i < 4, min_width=220, elem_id=f"card-{i}", elem_classes=["rlhf-card"]) as col:
                ui.texts.append(gr.Textbox(label=LETTERS[i], lines=8, max_lines=20, interactive=False,
                                           elem_id=f"comp-{i}", buttons=["copy"]))
                ui.scores.append(gr.Markdown(act.score_md(None), elem_id=f"score-{i}"))
                ui.stars.append(gr.Radio(["1", "2", "3", "4", "5"], label="Stars", elem_id=f"stars-{i}"))
                with gr.Row():
                    ui.ups.append(gr.Button("Thumbs up (u)", size="sm", elem_id=f"up-{i}", min_width=40))
                    ui.downs.append(gr.Button("Thumbs down (d)", size="sm", elem_id=f"down-{i}", min_width=40))
                ui.tags.append(gr.CheckboxGroup(list(studio.reason_tags), label="Thumbs-down reasons",
                                                elem_id=f"tags-{i}"))
            ui.cols.append(col)


def _comparisons(ui) -> None:
    """Pairwise choice (with a suggestion), ranking, critique and rewrite, and the hidden idempotency key."""
    with gr.Row():
        with gr.Column():
            gr.Markdown("**Pairwise choice**")
            with gr.Row():
                ui.left = gr.Dropdown(list(LETTERS[:4]), value="A", label="A side", elem_id="pair-left")
                ui.right = gr.Dropdown(list(LETTERS[:4]), value="B", label="B side", elem_id="pair-right")
            ui.winner = gr.Radio(WINNER_CHOICES, label="Which is better?", elem_id="winner")
            ui.compare_btn = gr.Button("Save choice", elem_id="compare-btn")
            ui.suggest_btn = gr.Button("Suggest what to label next", size="sm", elem_id="suggest-btn")
            ui.suggestion = gr.Markdown(elem_id="suggestion")
        with gr.Column():
            gr.Markdown("**Ranking** (all shown completions, best first)")
            ui.ranking = gr.Textbox(label="Order, e.g. B A D C", elem_id="ranking")
            ui.rank_btn = gr.Button("Save ranking", elem_id="rank-btn")
        with gr.Column():
            gr.Markdown("**Critique and corrected rewrite**")
            ui.target = gr.Dropdown(list(LETTERS[:4]), value="A", label="Completion", elem_id="critique-target")
            ui.critique = gr.Textbox(label="Critique", lines=2, elem_id="critique")
            ui.rewrite = gr.Textbox(label="Corrected rewrite (optional)", lines=3, elem_id="rewrite")
            ui.critique_btn = gr.Button("Save critique", elem_id="critique-btn")
    # A fresh key per page load and after each saved label: a double click or a retried request carries the same
    # key and content, so it is stored once (API callers may pass their own key, or none).
    ui.label_key = gr.Textbox(value="", visible=False, elem_id="label-key", label="Idempotency key")


def build(studio, role: str = "owner"):
    """Lay out the tab and wire its events; returns what app.py wires on page load and across tabs."""
    ui = SimpleNamespace(ids=gr.State([]))          # completion ids shown, slot order
    _prompt_area(ui, role)
    _settings(ui)
    _cards(ui, studio)
    _comparisons(ui)
    _wire_generation(ui, studio)
    _wire_labels(ui, studio)
    _wire_library(ui, studio)
    return dict(on_load=(bind(act.page_load, studio), [ui.library, ui.label_key, ui.starter_btn]),
                criteria=(bind(act.criteria_update, studio), [ui.criterion, ui.rubric]),
                adapter=ui.adapter, owner_only=[ui.prompts_box, ui.criteria_box], blind_hidden=[ui.adapter])


# ------------------------------------------------------------------------------------------------ events
def _slots(ui) -> list:
    """The outputs generate_actions.SLOTS counts, in its order."""
    return ui.cols + ui.texts + ui.stars + ui.tags + [ui.left, ui.right, ui.target]


def _wire_generation(ui, studio) -> None:
    gen_inputs = [ui.prompt, ui.n, ui.max_new, ui.temperature, ui.top_p, ui.seed, ui.adapter]
    gen_outputs = [ui.ids, ui.status] + _slots(ui) + ui.scores
    on_generate = bind(act.on_generate, studio)
    gen_event = ui.gen_btn.click(on_generate, gen_inputs, gen_outputs, concurrency_limit=2,
                                 concurrency_id="generate", api_name="generate")
    ui.prompt.submit(on_generate, gen_inputs, gen_outputs, concurrency_limit=2, concurrency_id="generate",
                     api_visibility="private")
    ui.stop_btn.click(act.on_stop, None, ui.status, queue=False, api_name="stop")
    gen_event.then(bind(act.library_choices, studio), None, ui.library, api_visibility="private")


def _wire_labels(ui, studio) -> None:
    label_outputs = [ui.status] + ui.scores + [ui.label_key]
    ids, crit, key = ui.ids, ui.criterion, ui.label_key
    for i in range(MAX_N):
        letter = LETTERS[i].lower()
        ui.stars[i].input(bind(act.on_star, studio, i), [ids, ui.stars[i], crit, key], label_outputs,
                          concurrency_limit=8, api_name=f"rate_{letter}")
        ui.ups[i].click(bind(act.on_thumb, studio, i, True), [ids, ui.tags[i], crit, key], label_outputs,
                        concurrency_limit=8, api_name=f"thumbs_up_{letter}")
        ui.downs[i].click(bind(act.on_thumb, studio, i, False), [ids, ui.tags[i], crit, key], label_outputs,
                          concurrency_limit=8, api_name=f"thumbs_down_{letter}")
    ui.compare_btn.click(bind(act.on_compare, studio), [ids, ui.left, ui.right, ui.winner, crit, key], label_outputs,
                         api_name="compare")
    ui.rank_btn.click(bind(act.on_rank, studio), [ids, ui.ranking, crit, key], label_outputs, api_name="rank")
    ui.critique_btn.click(bind(act.on_critique, studio), [ids, ui.target, ui.critique, ui.rewrite, crit, key],
                          label_outputs + [ui.critique, ui.rewrite], api_name="critique")
    ui.undo_btn.click(bind(act.on_undo, studio), [ids, key], label_outputs + ui.stars, api_name="undo_label")
    ui.criterion.input(bind(act.on_criterion, studio), [ids, crit], ui.stars, api_visibility="private")
    ui.suggest_btn.click(bind(act.on_suggest, studio), [ids], [ui.left, ui.right, ui.suggestion],
                         api_name="suggest_pair")


def _wire_library(ui, studio) -> None:
    shown_outputs = [ui.ids, ui.prompt, ui.status] + _slots(ui) + ui.scores
    library = bind(act.library_choices, studio)
    ui.next_btn.click(bind(act.on_next, studio), [ui.criterion], shown_outputs, api_name="next_prompt")
    ui.load_btn.click(bind(act.on_load, studio), [ui.library, ui.criterion], shown_outputs,
                      api_name="load_prompt")
    ui.crit_btn.click(bind(act.on_add_criterion, studio), [ui.crit_name, ui.crit_desc],
                      [ui.status, ui.criterion, ui.rubric, ui.crit_name], api_name="add_criterion")
    ui.add_btn.click(bind(act.on_add, studio), [ui.new_prompts], [ui.status, ui.new_prompts],
                     api_name="add_prompts").then(library, None, ui.library)
    ui.import_btn.click(bind(act.on_import_prompts, studio), [ui.prompt_file], ui.status,
                        api_name="import_prompts").then(library, None, ui.library)
    ui.starter_btn.click(bind(act.on_starter, studio), None, [ui.status, ui.starter_btn],
                         api_name="load_starter_prompts").then(library, None, ui.library)
