"""The Train tab's algorithm picker: PPO keeps its own settings (train.py); RLOO, GRPO, DPO and KTO each show
only their own settings, launch through `Studio.train(algorithm=...)` and draw their own curves.

Handlers are named functions of plain values; `wire()` connects them to the tab in a few lines.
"""
from __future__ import annotations

import html

import gradio as gr
from plotly.subplots import make_subplots
import plotly.graph_objects as go

from .. import plots
from ..auth import require_owner
from ..errors import StudioError
from .common import fail, ok

CHOICES = [("PPO", "ppo"), ("RLOO", "rloo"), ("GRPO", "grpo"), ("DPO (preference pairs, offline)", "dpo"),
           ("KTO (good / bad labels, offline)", "kto")]
OFFLINE = ("dpo", "kto")

# (config field, label, default, kind): kind is int, float or a list of choices. The one place where UI values
# become config fields (with _settings below).
_ONLINE = [("steps", "Steps", 20, int), ("prompts_per_step", "Prompts per step", 4, int),
           ("k", "Completions per prompt (k)", 4, int), ("max_new_tokens", "New tokens", 32, int),
           ("epochs", "Epochs", 1, int), ("lr", "Learning rate", 1e-4, float)]
_OFFLINE = [("steps", "Steps", 20, int), ("max_completion_tokens", "Completion tokens", 128, int),
            ("lr", "Learning rate", 5e-5, float), ("beta", "β", 0.1, float)]
_COMMON = [("lora_r", "LoRA rank", 16, int), ("checkpoint_every", "Checkpoint every N steps", 5, int),
           ("seed", "Seed", 0, int)]
FIELDS = {
    "rloo": _ONLINE + [("kl_coef", "KL penalty β (in the reward)", 0.05, float)] + _COMMON,
    "grpo": _ONLINE + [("kl_coef", "KL term β (in the loss)", 0.04, float)] + _COMMON,
    "dpo": _OFFLINE + [("batch_size", "Pairs per step", 8, int),
                       ("loss_type", "Loss", ["sigmoid", "ipo", "simpo"], list)] + _COMMON,
    "kto": _OFFLINE + [("batch_size", "Labels per step", 8, int),
                       ("desirable_weight", "Weight of good labels", 1.0, float),
                       ("undesirable_weight", "Weight of bad labels", 1.0, float)] + _COMMON,
}

# (metric, panel title) of each algorithm's curves
PANELS = {
    "dpo": [("loss", "loss"), ("reward_margin", "reward margin (chosen - rejected)"),
            ("reward_accuracy", "reward accuracy"), ("logp_chosen", "log-prob chosen"),
            ("logp_rejected", "log-prob rejected"), ("grad_norm", "gradient norm")],
    "kto": [("loss", "loss"), ("reward_desirable", "reward of good labels"),
            ("reward_undesirable", "reward of bad labels"), ("kl", "KL reference point"),
            ("logp_desirable", "log-prob good"), ("logp_undesirable", "log-prob bad")],
    "rloo": [("reward_mean", "reward (mean)"), ("rlhf_reward", "reward - β KL"), ("kl", "KL to reference"),
             ("policy_loss", "policy loss"), ("entropy", "entropy"), ("response_len", "response length")],
    "grpo": [("reward_mean", "reward (mean)"), ("kl", "KL to reference"), ("kl_term", "KL term (per token)"),
             ("policy_loss", "policy loss"), ("entropy", "entropy"), ("response_len", "response length")],
}


def settings(algorithm: str, values: list) -> dict:
    """UI values (in FIELDS order) -> config fields of `algorithm`; an empty field raises ValueError."""
    out = {}
    for (name, label, _, kind), v in zip(FIELDS[algorithm], values):
        if v in (None, ""):
            raise ValueError(f"fill in {label}")
        out[name] = v if kind is list else kind(v)
    out["lora_alpha"] = 2 * out["lora_r"]
    if algorithm not in OFFLINE:        # one optimiser step over the step's completions
        out["mini_batch_size"] = out["prompts_per_step"] * out["k"]
    return out


def curves(metrics, algorithm: str) -> go.Figure:
    """The run's curves: PPO's panels for PPO, else the algorithm's own."""
    if algorithm not in PANELS:
        return plots.ppo_curves(metrics)
    name = algorithm.upper()
    if metrics is None or len(metrics) == 0:
        return plots.empty(name, "no steps yet")
    panels = PANELS[algorithm]
    fig = make_subplots(rows=2, cols=3, subplot_titles=[t for _, t in panels])
    for i, (col, _) in enumerate(panels):
        if col in metrics:
            r, c = divmod(i, 3)
            fig.add_trace(go.Scatter(x=metrics["step"], y=metrics[col], mode="lines+markers", showlegend=False),
                          row=r + 1, col=c + 1)
    fig.update_layout(height=480, margin=dict(l=40, r=20, t=50, b=40), title=f"{name} training")
    return fig


# ------------------------------------------------------------------------------------------------- handlers
def on_algorithm(algorithm: str):
    """Visibility: PPO's own rows for PPO; else this algorithm's settings and launch button (and the reward
    tier only for the online ones)."""
    ppo = algorithm == "ppo"
    groups = [gr.update(visible=a == algorithm) for a in FIELDS]
    label = {v: name for name, v in CHOICES}.get(algorithm, algorithm).split(" (")[0]
    return [gr.update(visible=ppo), gr.update(visible=ppo), gr.update(visible=algorithm not in OFFLINE),
            gr.update(visible=not ppo, value=f"Launch {label}"), *groups]


def on_launch(studio, algorithm: str, tier: str, pinned_version: int | None, values: list,
              request: gr.Request | None = None) -> str:
    try:
        require_owner(studio, request, "launch training")
        cfg = settings(algorithm, values)
    except (StudioError, ValueError, TypeError) as e:
        return fail(f"invalid {algorithm.upper()} settings: {e}" if not isinstance(e, StudioError) else e)
    kw = {}
    if algorithm not in OFFLINE:
        kw = dict(reward_tier=tier if pinned_version is None else None, reward_version=pinned_version)
    try:
        h = studio.train(algorithm, wait=False, **kw, **cfg)
    except (StudioError, ValueError) as e:
        return fail(e)
    return ok(f"{algorithm.upper()} run {h.run_id} started in the background (closing this tab does not stop it)")


def memory_md(studio, algorithm: str, values: list) -> str:
    """The memory estimate of this algorithm's run with these settings."""
    try:
        fields = settings(algorithm, values)
        cfg = studio.jobs.config_of(algorithm, fields.pop("steps"), fields)
        est = studio.jobs.memory_estimate(cfg.engine_config())
    except (StudioError, ValueError, TypeError) as e:
        return f"memory estimate unavailable: {html.escape(str(e))}"
    line = f"Estimated memory for this run: **{est['bytes'] / 2**30:.2f} GiB**"
    if est.get("available_bytes"):
        line += f" of {est['available_bytes'] / 2**30:.1f} GiB available"
        if est["bytes"] > est["available_bytes"]:
            line += " — will not fit: lower the batch or lengths, or load the base in 4-bit"
    return line


# ---------------------------------------------------------------------------------------------------- layout
def picker(owner: bool) -> gr.Radio:
    return gr.Radio(CHOICES, value="ppo", label="Algorithm", visible=owner, elem_id="train-algorithm",
                    info="PPO, RLOO and GRPO sample and learn from the reward model; DPO and KTO learn offline "
                         "from your labels (docs/ALGORITHMS.md: which one to use)")


def build(owner: bool) -> dict:
    """Each algorithm's settings (hidden until picked) and its launch button."""
    groups, inputs = {}, {}
    for alg, fields in FIELDS.items():
        with gr.Row(visible=False) as row:
            comps = []
            for name, label, default, kind in fields:
                eid = f"{alg}-{name.replace('_', '-')}"
                if kind is list:
                    comps.append(gr.Dropdown(default, value=default[0], label=label, elem_id=eid))
                else:
                    comps.append(gr.Number(default, precision=0 if kind is int else None, label=label,
                                           elem_id=eid))
        groups[alg], inputs[alg] = row, comps
    with gr.Row(visible=owner) as launch_row:
        launch = gr.Button("Launch", variant="primary", visible=False, elem_id="algorithm-launch")
    return dict(groups=groups, inputs=inputs, launch=launch, launch_row=launch_row)


def wire(studio, radio, built: dict, ppo_only: list, tier, pinned, action, memory, then: tuple, pin_of) -> None:
    """Connect the picker: visibility, launch (then the tab's refresh), the memory estimate."""
    quiet = dict(show_progress="hidden", api_visibility="private")
    groups, inputs = built["groups"], built["inputs"]
    radio.change(on_algorithm, radio, [*ppo_only, tier, built["launch"], *groups.values()], **quiet)
    flat = [c for alg in FIELDS for c in inputs[alg]]
    spans, i = {}, 0
    for alg in FIELDS:
        spans[alg] = (i, i + len(inputs[alg]))
        i += len(inputs[alg])

    def launch_clicked(algorithm, tier_, pinned_, *vals, request: gr.Request = None):
        a, b = spans.get(algorithm, (0, 0))
        return on_launch(studio, algorithm, tier_, pin_of(pinned_), list(vals[a:b]), request)

    def estimate(algorithm, *vals):
        if algorithm not in spans:
            return gr.skip()
        a, b = spans[algorithm]
        return memory_md(studio, algorithm, list(vals[a:b]))

    built["launch"].click(launch_clicked, [radio, tier, pinned, *flat], action, api_name="launch_training").then(
        *then, **quiet)
    gr.on([radio.change] + [c.change for c in flat], estimate, [radio, *flat], memory, **quiet)
