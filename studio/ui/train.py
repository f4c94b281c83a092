"""Train (PPO) tab: settings mapped to PPOConfig in one place, memory estimate, launch / cancel / resume,
live curves with ETA, sample rollouts, runs and adapters, export."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from . import algorithms, watch_panel
from . import train_actions as act
from .common import bind
# the tab's helpers, under the names other modules and the tests use
from .train_actions import (SAMPLE_COLUMNS, SETTING_LABELS, display_tables, empty_samples, pin_of,  # noqa: F401
                            ppo_settings, reward_choice_md)

# the PPO settings fields: (default, whole number?, elem_id), labelled by SETTING_LABELS; learning rate and epochs
# from the loop benchmark (docs/LEARNING.md, "Defaults that work")
SETTING_FIELDS = [(20, True, "ppo-steps"), (8, True, "ppo-batch"), (32, True, "ppo-new-tokens"),
                  (2, True, "ppo-epochs"), (1e-3, False, "ppo-lr"), (0.05, False, "ppo-kl"),
                  (16, True, "ppo-lora-r"), (5, True, "ppo-ckpt"), (0, True, "ppo-seed")]


def _settings_area(ui, owner: bool) -> None:
    """The algorithm, PPO's settings, the reward model, the training passes, the memory estimate and the launch
    row."""
    ui.algorithm = algorithms.picker(owner)
    with gr.Row(visible=owner) as ui.settings_row:
        ui.inputs = [gr.Number(default, precision=0 if whole else None, label=label, elem_id=elem_id)
                     for label, (default, whole, elem_id) in zip(SETTING_LABELS, SETTING_FIELDS)]
    ui.algo = algorithms.build(owner)      # the other algorithms' settings, shown when picked
    ui.tier = gr.Radio([("Deep tier (if trained)", "deep"), ("Fast tier", "fast")], value="deep",
                       label="Reward model", visible=owner, elem_id="ppo-tier")
    with gr.Row(visible=owner) as ui.choice_row:
        ui.reward_choice = gr.Markdown(elem_id="ppo-reward-choice")
        ui.unpin = gr.Button("Use the latest version instead", size="sm", visible=False, elem_id="ppo-unpin")
    # PPOConfig.compile: worth it for long runs on a GPU (docs/GPU.md)
    ui.compile = gr.Radio([("Eager", "off"), ("Compiled on a GPU (faster steps for long runs; the first step "
                                              "compiles, ~1 min)", "auto")],
                          value="off", label="Training passes", visible=owner, elem_id="ppo-compile")
    ui.memory = gr.Markdown(elem_id="ppo-memory")
    with gr.Row(visible=owner) as ui.launch_row:
        ui.launch = gr.Button("Launch PPO", variant="primary", elem_id="ppo-launch")
        ui.cancel = gr.Button("Cancel", elem_id="ppo-cancel")
        # a list of the runs that can resume (a number field showed "0" when empty, which looked like a run id)
        ui.resume_id = gr.Dropdown([], value=None, label="Run to resume", allow_custom_value=True,
                                   info="cancelled, failed or interrupted PPO runs", elem_id="ppo-resume-id")
        ui.resume = gr.Button("Resume", elem_id="ppo-resume")


def _run_area(ui, studio, owner: bool) -> None:
    """The action line, the latest run (status, progress, curves, the watch panel, samples), runs, adapters and
    the export row; the states the refresh keeps and the 2 s timer."""
    # Launch / Cancel / Resume answers: their own area, kept until the next action (#ppo-status is redrawn by
    # the 2 s refresh and used to wipe them within a second or two)
    ui.action = gr.Markdown(elem_id="ppo-action")
    ui.status = gr.Markdown(elem_id="ppo-status")
    ui.progress = gr.Slider(0, 100, value=0, label="Progress (%)", interactive=False, elem_id="ppo-progress")
    ui.curves = gr.Plot(elem_id="ppo-curves")
    watch_slot = gr.Column()     # the reward-hacking watch (watch_panel.py), filled once the timer exists
    ui.samples = gr.Dataframe(empty_samples(), label="Sample rollouts (latest steps)", interactive=False,
                              wrap=True, elem_id="ppo-samples")
    ui.runs = gr.Dataframe(label="Runs", interactive=False, elem_id="ppo-runs")
    ui.adapters = gr.Dataframe(label="Adapters", interactive=False, elem_id="ppo-adapters")
    with gr.Row(visible=owner) as ui.export_row:
        ui.export_id = gr.Dropdown([], value=None, label="Adapter", allow_custom_value=True, elem_id="export-id")
        ui.export_path = gr.Textbox(label=f"Export to a folder in {studio.export_dir}", elem_id="export-path")
        ui.merged = gr.Checkbox(label="Merged full model", elem_id="export-merged")
        ui.export_btn = gr.Button("Export adapter", elem_id="export-btn")
    ui.export_msg = gr.Markdown()
    # what the dropdowns above were last sent (per session), so the 2 s refresh redraws them only on a change
    ui.known = gr.State(None)
    # the adapter ids: changes when a run adds an adapter (app.py refreshes the other tabs' policy lists on it)
    try:
        now_ids = sorted(int(i) for i in studio.adapters()["id"])
    except Exception:
        now_ids = None
    ui.adapter_ids = gr.State(now_ids)     # as of start-up: a page load then fires no change unless one was added
    ui.timer = gr.Timer(2.0)               # Gradio ticks it only while this tab is open
    with watch_slot:
        watch_panel.build(studio, ui.timer, studio.latest_ppo, owner)


def build(studio, role: str = "owner", pinned: gr.State | None = None):
    """The Train tab. pinned: the per-session State holding the reward-model version chosen in the Reward tab (a
    fresh one when the tab is built alone)."""
    owner = role == "owner"
    ui = SimpleNamespace(pinned=gr.State(None) if pinned is None else pinned)
    _settings_area(ui, owner)
    _run_area(ui, studio, owner)
    refresh = _wire(ui, studio)
    return dict(on_load=refresh, adapters=(bind(act.adapter_choices, studio), None),
                adapter_ids=ui.adapter_ids, pinned=ui.pinned,
                owner_only=[ui.settings_row, ui.tier, ui.choice_row, ui.compile, ui.launch_row, ui.export_row,
                            ui.algorithm, ui.algo["launch_row"]])


def _wire(ui, studio) -> tuple:
    """Wire the tab's events; returns the refresh as (fn, inputs, outputs) for the page load."""
    refresh = bind(act.refresh, studio)       # one function for every event that refreshes (tests find it by name)
    refresh_inputs = [ui.tier, ui.pinned, ui.known]
    outputs = [getattr(ui, name) for name in act.REFRESH_OUTPUTS]
    quiet = dict(show_progress="hidden", api_visibility="private")
    ui.launch.click(bind(act.on_launch, studio), ui.inputs + [ui.tier, ui.compile, ui.pinned], ui.action,
                    api_name="launch_ppo").then(refresh, refresh_inputs, outputs, **quiet)
    ui.cancel.click(bind(act.on_cancel, studio), None, ui.action, api_name="cancel_ppo").then(
        refresh, refresh_inputs, outputs, **quiet)
    ui.resume.click(bind(act.on_resume, studio), [ui.resume_id], ui.action, api_name="resume_ppo").then(
        refresh, refresh_inputs, outputs, **quiet)
    ui.export_btn.click(bind(act.on_export, studio), [ui.export_id, ui.export_path, ui.merged], ui.export_msg,
                        api_name="export_adapter")
    # the memory estimate: on page load and whenever a setting, the training passes or the reward tier change
    gr.on(None, bind(act.on_settings, studio), ui.inputs + [ui.compile, ui.tier], ui.memory, **quiet)
    # which reward model a launch uses: on page load, on a tier change and when the pin changes (Reward tab)
    gr.on(None, bind(act.on_choice, studio), [ui.tier, ui.pinned], [ui.reward_choice, ui.unpin], **quiet)
    ui.unpin.click(lambda: None, None, ui.pinned, api_visibility="private")
    # a timer-driven refresh shows no "processing" overlay over the status every 2 s
    ui.timer.tick(refresh, refresh_inputs, outputs, **quiet)
    algorithms.wire(studio, ui.algorithm, ui.algo, [ui.settings_row, ui.launch, ui.compile], ui.tier, ui.pinned,
                    ui.action, ui.memory, (refresh, refresh_inputs, outputs), pin_of)
    return refresh, refresh_inputs, outputs
