"""Train (PPO) tab: settings mapped to PPOConfig in one place, memory estimate, launch / cancel / resume,
live curves with ETA, sample rollouts, runs and adapters, export."""
from __future__ import annotations

import html

import gradio as gr

from .. import plots
from ..errors import StudioError
from ..auth import require_owner
from .common import fail, ok


def ppo_settings(steps, batch_size, max_new_tokens, ppo_epochs, lr, kl_coef, lora_r, checkpoint_every, seed,
                 compile: str = "off") -> dict:
    """The one place where UI values become PPOConfig fields."""
    return dict(steps=int(steps), batch_size=int(batch_size), mini_batch_size=int(batch_size),
                max_new_tokens=int(max_new_tokens), ppo_epochs=int(ppo_epochs), lr=float(lr),
                kl_coef=float(kl_coef), lora_r=int(lora_r), lora_alpha=2 * int(lora_r),
                checkpoint_every=int(checkpoint_every), seed=int(seed), compile=compile or "off")


def _cell(v) -> str:
    """A JSON cell as short text (a browser table shows a dict as "[object Object]")."""
    if isinstance(v, dict):
        return ", ".join(f"{k}={_cell(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return f"{len(v)} items" if len(v) > 3 else ", ".join(map(str, v))
    return "" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _config_summary(c: dict) -> str:
    """The settings a user tells runs apart by; the full config stays in the database."""
    if not isinstance(c, dict):
        return _cell(c)
    parts = [("steps", "steps"), ("batch_size", "prompts/step"), ("max_new_tokens", "new tokens"),
             ("ppo_epochs", "epochs"), ("lr", "lr"), ("kl_coef", "β"), ("lora_r", "LoRA r"), ("compile", "compile")]
    return " · ".join(f"{label} {_cell(c[k])}" for k, label in parts if k in c)


def _lineage_summary(lin: dict) -> str:
    """Where a run came from: its reward model and data (the base's revision hash stays in the database)."""
    if not isinstance(lin, dict):
        return _cell(lin)
    parts = []
    if "reward_tier" in lin or "reward_version" in lin:
        ver = lin.get("reward_version")
        parts.append(" ".join(x for x in ("reward", _cell(lin.get("reward_tier")), "" if ver is None else f"v{ver}")
                              if x))
    parts += [f"{_cell(lin[k])} {label}" for k, label in (("feedback_labels", "labels"), ("prompts", "prompts"))
              if k in lin]
    if "base_model" in lin:
        parts.append(f"base {_cell(lin['base_model'])}")
    return " · ".join(parts) or _cell(lin)


def display_tables(runs, adapters):
    """The runs and adapters tables as the tab shows them: JSON columns as readable text."""
    def fmt(df, summaries: dict):
        if df is None or not len(df):
            return df
        df = df.copy()
        for col in df.columns:
            if df[col].map(lambda v: isinstance(v, (dict, list, tuple))).any():
                df[col] = df[col].map(summaries.get(col, _cell))
        return df
    return fmt(runs, {"config": _config_summary, "lineage": _lineage_summary}), fmt(adapters, {})


def _memory_md(studio, settings: dict) -> str:
    try:
        from components.ppo.config import PPOConfig
        est = studio.jobs.memory_estimate(PPOConfig(**settings))
    except Exception as e:
        return f"memory estimate unavailable: {html.escape(str(e))}"
    need = est["bytes"] / 2**30
    avail = est.get("available_bytes")
    line = f"Estimated memory for this run: **{need:.2f} GiB**"
    if avail:
        line += f" of {avail / 2**30:.1f} GiB available"
        if est["bytes"] > avail:
            line += " — will not fit: lower batch size / new tokens or load the base in 4-bit"
    return line


def build(studio, role: str = "owner"):
    owner = role == "owner"
    with gr.Row(visible=owner) as settings_row:
        steps = gr.Number(20, precision=0, label="Steps", elem_id="ppo-steps")
        batch = gr.Number(8, precision=0, label="Prompts per step", elem_id="ppo-batch")
        new_tokens = gr.Number(32, precision=0, label="New tokens", elem_id="ppo-new-tokens")
        epochs = gr.Number(4, precision=0, label="PPO epochs", elem_id="ppo-epochs")
        lr = gr.Number(1e-4, label="Learning rate", elem_id="ppo-lr")
        kl = gr.Number(0.05, label="KL coefficient β", elem_id="ppo-kl")
        lora_r = gr.Number(16, precision=0, label="LoRA rank", elem_id="ppo-lora-r")
        ckpt = gr.Number(5, precision=0, label="Checkpoint every N steps", elem_id="ppo-ckpt")
        seed = gr.Number(0, precision=0, label="Seed", elem_id="ppo-seed")
    tier = gr.Radio([("Deep tier (if trained)", "deep"), ("Fast tier", "fast")], value="deep",
                    label="Reward model", visible=owner, elem_id="ppo-tier")
    # PPOConfig.compile: worth it for long runs on a GPU (faster steps after a first one that compiles)
    compile_ = gr.Radio([("Eager", "off"), ("Compiled on a GPU (the first step compiles, 1-2 min)", "auto")],
                        value="off", label="Training passes", visible=owner, elem_id="ppo-compile")
    memory = gr.Markdown(elem_id="ppo-memory")
    with gr.Row(visible=owner) as launch_row:
        launch = gr.Button("Launch PPO", variant="primary", elem_id="ppo-launch")
        cancel = gr.Button("Cancel", elem_id="ppo-cancel")
        resume_id = gr.Number(None, precision=0, label="Run id to resume", elem_id="ppo-resume-id")
        resume = gr.Button("Resume", elem_id="ppo-resume")
    status = gr.Markdown(elem_id="ppo-status")
    progress = gr.Slider(0, 100, value=0, label="Progress (%)", interactive=False, elem_id="ppo-progress")
    curves = gr.Plot(elem_id="ppo-curves")
    samples = gr.Dataframe(label="Sample rollouts (latest steps)", interactive=False, wrap=True,
                           elem_id="ppo-samples")
    runs = gr.Dataframe(label="Runs", interactive=False, elem_id="ppo-runs")
    adapters = gr.Dataframe(label="Adapters", interactive=False, elem_id="ppo-adapters")
    with gr.Row(visible=owner) as export_row:
        export_id = gr.Number(None, precision=0, label="Adapter id", elem_id="export-id")
        export_path = gr.Textbox(label="Export to folder", elem_id="export-path")
        merged = gr.Checkbox(label="Merged full model", elem_id="export-merged")
        export_btn = gr.Button("Export adapter", elem_id="export-btn")
    export_msg = gr.Markdown()
    timer = gr.Timer(2.0)
    inputs = [steps, batch, new_tokens, epochs, lr, kl, lora_r, ckpt, seed]

    def current_run_id():
        h = studio.jobs.current
        if h is not None:
            return h.run_id
        r = ppo_runs()
        return int(r.sort_values("id").iloc[-1]["id"]) if len(r) else None

    def ppo_runs():
        """This tab's runs: PPO only (deep reward-model updates are runs too; the Reward tab shows those)."""
        r = studio.runs()
        return r[r["kind"] == "ppo"] if len(r) else r

    def refresh():
        rid = current_run_id()
        rs, ad = display_tables(ppo_runs(), studio.adapters())
        if rid is None:
            return ("no run yet", 0, plots.ppo_curves(None), None, rs, ad)
        run = studio.store.run(rid)
        m = studio.store.run_metrics(rid)
        total = int(run["config"].get("steps", 1))
        done = int(m["step"].max()) if len(m) else 0
        pct = 100.0 * done / max(total, 1)
        eta = ""
        if len(m) >= 1 and run["status"] == "running" and "step_seconds" in m:
            eta = f" · ETA {m['step_seconds'].tail(5).mean() * (total - done):.0f} s"
        # error and notes as text: a message such as "<no compiler>" must not be taken for a tag
        err = f" — {html.escape(run['error'])}" if run.get("error") else ""
        notes = "".join(f"\n\nNote: {html.escape(n)}" for n in (run.get("notes") or "").splitlines())
        md = f"Run **{rid}**: {run['status']} · step {done}/{total}{eta}{err}{notes}"
        sm = studio.store.run_samples(rid)
        if len(sm):
            sm = sm.sort_values("step", ascending=False).head(12).round({"reward": 3})
        return (md, pct, plots.ppo_curves(m), sm, rs.iloc[::-1] if len(rs) else rs,
                ad.iloc[::-1] if len(ad) else ad)

    outputs = [status, progress, curves, samples, runs, adapters]

    def on_launch(steps_, batch_, new_, epochs_, lr_, kl_, r_, ckpt_, seed_, tier_, compile_mode="off",
                  request: gr.Request = None):
        try:
            require_owner(studio, request, "launch training")
            settings = ppo_settings(steps_, batch_, new_, epochs_, lr_, kl_, r_, ckpt_, seed_, compile_mode)
            version = getattr(studio.reward, "selected_version", None)
            h = studio.train_ppo(wait=False, reward_tier=tier_ if version is None else None,
                                 reward_version=version, **settings)
        except StudioError as e:
            return fail(e)
        return ok(f"run {h.run_id} started in the background (closing this tab does not stop it)")

    def on_cancel(request: gr.Request):
        try:
            require_owner(studio, request, "cancel training")
        except StudioError as e:
            return fail(e)
        h = studio.jobs.current
        if not h or not h.running():
            return fail("no training job is running")
        h.cancel()
        return ok(f"cancelling run {h.run_id} at the next step boundary (it saves first)")

    def on_resume(rid, request: gr.Request):
        try:
            require_owner(studio, request, "resume training")
        except StudioError as e:
            return fail(e)
        if rid in (None, ""):
            return fail("enter the id of an interrupted or cancelled run")
        try:
            h = studio.resume_ppo(int(rid))
        except (StudioError, KeyError) as e:
            return fail(e)
        return ok(f"run {h.run_id} resumed")

    def on_export(aid, path, merged_, request: gr.Request):
        try:
            require_owner(studio, request, "export adapters")
        except StudioError as e:
            return fail(e)
        if aid in (None, "") or not path:
            return fail("enter an adapter id and a folder")
        try:
            p = studio.export_adapter(int(aid), path, merged=bool(merged_))
        except StudioError as e:
            return fail(e)
        return ok(f"adapter {int(aid)} written to {p}")

    def on_settings(*vals):
        try:
            return _memory_md(studio, ppo_settings(*vals))
        except (TypeError, ValueError) as e:
            return fail(e)

    launch.click(on_launch, inputs + [tier, compile_], status, api_name="launch_ppo")
    cancel.click(on_cancel, None, status, api_name="cancel_ppo")
    resume.click(on_resume, [resume_id], status, api_name="resume_ppo")
    export_btn.click(on_export, [export_id, export_path, merged], export_msg, api_name="export_adapter")
    for c in inputs:
        c.change(on_settings, inputs, memory, api_visibility="private")
    timer.tick(refresh, None, outputs, api_visibility="private")

    def adapter_choices():
        ad = studio.adapters()
        return gr.update(choices=["base"] + [f"adapter-{int(i)}" for i in ad["id"]] if len(ad) else ["base"])
    return dict(on_load=(refresh, None, outputs), adapters=(adapter_choices, None),
                owner_only=[settings_row, tier, compile_, launch_row, export_row])
