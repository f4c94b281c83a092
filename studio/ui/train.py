"""Train (PPO) tab: settings mapped to PPOConfig in one place, memory estimate, launch / cancel / resume,
live curves with ETA, sample rollouts, runs and adapters, export."""
from __future__ import annotations

import gradio as gr

from .. import plots
from ..errors import StudioError
from ..auth import require_owner, role_of
from . import algorithms, watch_panel
from .common import blind_view, fail, md_text, ok, policy_names, unless_sent


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
    parts = [("algorithm", "algorithm"), ("steps", "steps"), ("batch_size", "prompts/step"),
             ("max_new_tokens", "new tokens"), ("ppo_epochs", "epochs"), ("lr", "lr"), ("kl_coef", "β"), ("lora_r", "LoRA r"), ("compile", "compile")]
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
        est = studio.ppo_memory_estimate(**settings)
    except Exception as e:
        return f"memory estimate unavailable: {md_text(e)}"
    need = est["bytes"] / 2**30
    avail = est.get("available_bytes")
    line = f"Estimated memory for this run: **{need:.2f} GiB**"
    if avail:
        line += f" of {avail / 2**30:.1f} GiB available"
        if est["bytes"] > avail:
            line += " — will not fit: lower batch size / new tokens or load the base in 4-bit"
    return line


SAMPLE_COLUMNS = ["step", "idx", "prompt", "response", "reward"]


def empty_samples():
    """The sample-rollouts table before any rollout: its real headers (an empty table otherwise reads "1 2 3")."""
    import pandas as pd
    return pd.DataFrame({c: [] for c in SAMPLE_COLUMNS})


def pin_of(pinned) -> int | None:
    """The reward-model version pinned in this browser session (the Reward tab's versions table), or None."""
    if isinstance(pinned, dict):
        pinned = pinned.get("version")
    try:
        return None if pinned in (None, "") else int(pinned)
    except (TypeError, ValueError):
        return None


def reward_choice_md(studio, tier, pinned, deep_version: int | None | bool = None) -> str:
    """Which reward model a launch from this browser session will use: "pinned version N", "latest deep" or
    "latest fast". deep_version: the newest deep version if known; False where no deep tier exists."""
    vid = pin_of(pinned)
    if vid is not None:
        ptier = pinned.get("tier") if isinstance(pinned, dict) else None
        return (f"PPO will use the **pinned reward-model version {vid}**{f' ({ptier} tier)' if ptier else ''}, "
                "chosen in the Reward tab's versions table for this browser tab; the reward-model choice above "
                "does not apply until you go back to the latest version.")
    if tier == "fast":
        return ("PPO will use the **latest fast** reward model (a snapshot of the fast tier is stored at launch).")
    if deep_version:
        return f"PPO will use the **latest deep** reward model (version {int(deep_version)})."
    return ("PPO would use the **latest deep** reward model, but none is trained yet: train the deep tier in the "
            "Reward tab, or choose the fast tier.")


def _parse_id(value, what: str) -> int:
    """A run or adapter id from a dropdown (its value) or typed in ("3", "run 3", "adapter-3")."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a whole number")
    if isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    text = str(value).strip().lower()
    for prefix in ("run", "adapter-", "adapter", "#"):
        text = text.removeprefix(prefix).strip()
    if not text.isdigit():
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(text)


def build(studio, role: str = "owner", pinned: gr.State | None = None):
    """The Train tab. pinned: the per-session State holding the reward-model version chosen in the Reward tab (a
    fresh one when the tab is built alone)."""
    owner = role == "owner"
    if pinned is None:
        pinned = gr.State(None)
    algorithm = algorithms.picker(owner)
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
    algo = algorithms.build(owner)      # the other algorithms' settings, shown when picked
    tier = gr.Radio([("Deep tier (if trained)", "deep"), ("Fast tier", "fast")], value="deep",
                    label="Reward model", visible=owner, elem_id="ppo-tier")
    with gr.Row(visible=owner) as choice_row:
        reward_choice = gr.Markdown(elem_id="ppo-reward-choice")
        unpin = gr.Button("Use the latest version instead", size="sm", visible=False, elem_id="ppo-unpin")
    # PPOConfig.compile: worth it for long runs on a GPU (an H200 at 1.7B: 2.1x faster training phases, paid back
    # after ~100-130 steps; docs/GPU.md)
    compile_ = gr.Radio([("Eager", "off"),
                         ("Compiled on a GPU (faster steps for long runs; the first step compiles, ~1 min)", "auto")],
                        value="off", label="Training passes", visible=owner, elem_id="ppo-compile")
    memory = gr.Markdown(elem_id="ppo-memory")
    with gr.Row(visible=owner) as launch_row:
        launch = gr.Button("Launch PPO", variant="primary", elem_id="ppo-launch")
        cancel = gr.Button("Cancel", elem_id="ppo-cancel")
        # a list of the runs that can resume (a number field showed "0" when empty, which looked like a run id)
        resume_id = gr.Dropdown([], value=None, label="Run to resume", allow_custom_value=True,
                                info="cancelled, failed or interrupted PPO runs", elem_id="ppo-resume-id")
        resume = gr.Button("Resume", elem_id="ppo-resume")
    # Launch / Cancel / Resume answers: their own area, kept until the next action (#ppo-status is redrawn by
    # the 2 s refresh and used to wipe them within a second or two)
    action = gr.Markdown(elem_id="ppo-action")
    status = gr.Markdown(elem_id="ppo-status")
    progress = gr.Slider(0, 100, value=0, label="Progress (%)", interactive=False, elem_id="ppo-progress")
    curves = gr.Plot(elem_id="ppo-curves")
    watch_slot = gr.Column()     # the reward-hacking watch (watch_panel.py), filled once the timer exists
    samples = gr.Dataframe(empty_samples(), label="Sample rollouts (latest steps)", interactive=False, wrap=True,
                           elem_id="ppo-samples")
    runs = gr.Dataframe(label="Runs", interactive=False, elem_id="ppo-runs")
    adapters = gr.Dataframe(label="Adapters", interactive=False, elem_id="ppo-adapters")
    with gr.Row(visible=owner) as export_row:
        export_id = gr.Dropdown([], value=None, label="Adapter", allow_custom_value=True, elem_id="export-id")
        export_path = gr.Textbox(label=f"Export to a folder in {studio.export_dir}", elem_id="export-path")
        merged = gr.Checkbox(label="Merged full model", elem_id="export-merged")
        export_btn = gr.Button("Export adapter", elem_id="export-btn")
    export_msg = gr.Markdown()
    # what the dropdowns above were last sent (per session), so the 2 s refresh redraws them only on a change
    known = gr.State(None)
    # the adapter ids: changes when a run adds an adapter (app.py refreshes the other tabs' policy lists on it)
    try:
        now_ids = sorted(int(i) for i in studio.adapters()["id"])
    except Exception:
        now_ids = None
    adapter_ids = gr.State(now_ids)     # as of start-up: a page load then fires no change unless one was added
    timer = gr.Timer(2.0)                     # Gradio ticks it only while this tab is open
    inputs = [steps, batch, new_tokens, epochs, lr, kl, lora_r, ckpt, seed]
    with watch_slot:
        watch_panel.build(studio, timer, studio.latest_ppo, owner)

    def ppo_runs():
        """This tab's runs: PPO only (deep reward-model updates are runs too; the Reward tab shows those)."""
        r = studio.runs()
        return r[r["kind"] == "ppo"] if len(r) else r

    def choice_now(tier_, pinned_, load_deep: bool):
        """The reward-choice line and the unpin button; load_deep: look the deep tier up in the database (on a
        change), else only what is in memory (the 2 s refresh: None where that is unknown, to leave it as is)."""
        if pin_of(pinned_) is None and tier_ != "fast":
            deep = studio.deep_reward_version(look_up=load_deep)
            if deep is None:
                return gr.skip(), gr.skip()
        else:
            deep = None
        return reward_choice_md(studio, tier_, pinned_, deep), gr.update(visible=pin_of(pinned_) is not None)

    def lists(raw_runs, raw_adapters, known_):
        """Choices of the resume and export dropdowns (newest first), sent only when they changed."""
        resumable = []
        if len(raw_runs):
            busy = studio.running_ppo()
            for r in raw_runs.sort_values("id", ascending=False).itertuples():
                if r.status not in ("completed", "running", "queued") and int(r.id) != busy:
                    resumable.append((f"run {int(r.id)} ({r.status})", int(r.id)))
        ads = []
        if len(raw_adapters):
            for a in raw_adapters.sort_values("id", ascending=False).itertuples():
                ads.append((f"adapter-{int(a.id)} (run {_cell(a.run_id)}, step {_cell(a.step)})", int(a.id)))
        now = {"resume": [list(c) for c in resumable], "export": [list(c) for c in ads]}
        old = known_ or {}
        up_resume = gr.skip() if old.get("resume") == now["resume"] else gr.update(
            choices=resumable, info="cancelled, failed or interrupted PPO runs" if resumable else
            "no cancelled, failed or interrupted PPO run to resume")
        up_export = gr.skip() if old.get("export") == now["export"] else gr.update(choices=ads)
        return up_resume, up_export, now, sorted(int(i) for i in raw_adapters["id"]) if len(raw_adapters) else []

    def refresh(tier_="deep", pinned_=None, known_=None, request: gr.Request = None):
        """Every 2 s while the tab is open. Builds and sends only what changed since this browser tab's last
        refresh (`known_`): rebuilding the curves and tables every tick cost the app ~0.8 s a tick for nothing.
        Nothing for an annotator: runs, rewards and adapter names are the owner's (the tab is hidden too)."""
        if role_of(studio, request) != "owner":
            return [gr.skip()] * len(outputs)
        rid = studio.latest_ppo()
        raw_runs, raw_ads = ppo_runs(), studio.adapters()
        rs, ad = display_tables(raw_runs, raw_ads)
        up_resume, up_export, known, ids = lists(raw_runs, raw_ads, known_)
        old = known_ or {}
        out = [*unless_sent(old, known, "runs", rs.iloc[::-1] if rid is not None and len(rs) else rs),
               *unless_sent(old, known, "adapters", ad.iloc[::-1] if rid is not None and len(ad) else ad),
               up_resume, up_export, known, ids, *choice_now(tier_, pinned_, load_deep=False)]
        if rid is None:
            return [*unless_sent(old, known, "status", "no run yet"), *unless_sent(old, known, "progress", 0),
                    *unless_sent(old, known, "curves", None, plots.ppo_curves),
                    *unless_sent(old, known, "samples", None, lambda _: empty_samples()), *out]
        run = studio.run(rid)
        run["status"] = "paused" if run["status"] == "cancelled" and studio.watch_pause(rid) else run["status"]
        m = studio.run_metrics(rid)
        total = int(run["config"].get("steps", 1))
        done = int(m["step"].max()) if len(m) else 0
        pct = 100.0 * done / max(total, 1)
        eta = ""
        if len(m) >= 1 and run["status"] == "running" and "step_seconds" in m:
            eta = f" · ETA {m['step_seconds'].tail(5).mean() * (total - done):.0f} s"
        # error and notes as text: a message such as "<no compiler>" must not be taken for a tag
        err = f" — {md_text(run['error'])}" if run.get("error") else ""
        notes = "".join(f"\n\nNote: {md_text(n)}" for n in (run.get("notes") or "").splitlines())
        md = f"Run **{rid}**: {run['status']} · step {done}/{total}{eta}{err}{notes}"

        def newest_samples(_):
            sm = studio.run_samples(rid)
            return sm.sort_values("step", ascending=False).head(12).round({"reward": 3}) if len(sm) else \
                empty_samples()
        return [*unless_sent(old, known, "status", md), *unless_sent(old, known, "progress", pct),
                *unless_sent(old, known, "curves", (rid, len(m)),
                             lambda _: algorithms.curves(m, run["config"].get("algorithm", "ppo"))),
                *unless_sent(old, known, "samples", (rid, done), newest_samples), *out]

    refresh_inputs = [tier, pinned, known]
    outputs = [status, progress, curves, samples, runs, adapters, resume_id, export_id, known, adapter_ids,
               reward_choice, unpin]

    def on_launch(steps_, batch_, new_, epochs_, lr_, kl_, r_, ckpt_, seed_, tier_, compile_mode="off",
                  pinned_=None, request: gr.Request = None):
        vals = [steps_, batch_, new_, epochs_, lr_, kl_, r_, ckpt_, seed_]
        try:
            require_owner(studio, request, "launch training")
        except StudioError as e:
            return fail(e)
        empty = [c.label for c, v in zip(inputs, vals) if v in (None, "")]
        if empty:
            return fail(f"invalid PPO settings: fill in {', '.join(empty)}")
        try:
            settings = ppo_settings(*vals, compile_mode)
        except (TypeError, ValueError) as e:
            return fail(f"invalid PPO settings: {e}")
        # the version pinned in this browser session's Reward tab, else the latest of the chosen tier
        version = pin_of(pinned_)
        try:
            h = studio.train_ppo(wait=False, reward_tier=tier_ if version is None else None,
                                 reward_version=version, **settings)
        except StudioError as e:
            return fail(e)
        used = f"pinned reward-model version {version}" if version is not None else f"the latest {tier_} tier"
        return ok(f"run {h.run_id} started in the background with {used} (closing this tab does not stop it)")

    def on_cancel(request: gr.Request):
        try:
            require_owner(studio, request, "cancel training")
        except StudioError as e:
            return fail(e)
        try:
            run_id = studio.cancel_ppo()
        except StudioError as e:
            return fail(e)
        return ok(f"cancelling run {run_id} at the next step boundary (it saves first)")

    def on_resume(rid, request: gr.Request):
        try:
            require_owner(studio, request, "resume training")
        except StudioError as e:
            return fail(e)
        if rid in (None, ""):
            return fail("choose a cancelled, failed or interrupted run to resume")
        try:
            run_id = _parse_id(rid, "the run id")
            h = studio.resume_ppo(run_id)
        except (StudioError, LookupError, ValueError) as e:     # the facade's StudioError names a missing run
            return fail(e)
        return ok(f"run {h.run_id} resumed")

    def on_export(aid, path, merged_, request: gr.Request):
        try:
            require_owner(studio, request, "export adapters")
        except StudioError as e:
            return fail(e)
        if aid in (None, "") or not path:
            return fail("choose an adapter and enter a folder")
        try:
            adapter_id = _parse_id(aid, "the adapter id")
            p = studio.app_export_adapter(adapter_id, path, merged=bool(merged_))
        except (StudioError, LookupError, ValueError) as e:     # the facade's StudioError names a missing adapter
            return fail(e)
        return ok(f"adapter {adapter_id} written to {p}")

    def on_settings(*vals):
        # vals: the settings fields, the compile mode, then the reward tier (a trigger only: same model size)
        try:
            return _memory_md(studio, ppo_settings(*vals[:len(inputs) + 1]))
        except (TypeError, ValueError) as e:
            return fail(e)

    def on_choice(tier_, pinned_):
        return choice_now(tier_, pinned_, load_deep=True)

    quiet = dict(show_progress="hidden", api_visibility="private")
    launch.click(on_launch, inputs + [tier, compile_, pinned], action, api_name="launch_ppo").then(
        refresh, refresh_inputs, outputs, **quiet)
    cancel.click(on_cancel, None, action, api_name="cancel_ppo").then(refresh, refresh_inputs, outputs, **quiet)
    resume.click(on_resume, [resume_id], action, api_name="resume_ppo").then(refresh, refresh_inputs, outputs,
                                                                             **quiet)
    export_btn.click(on_export, [export_id, export_path, merged], export_msg, api_name="export_adapter")
    # the memory estimate: on page load and whenever a setting, the training passes or the reward tier change
    gr.on(None, on_settings, inputs + [compile_, tier], memory, **quiet)
    # which reward model a launch uses: on page load, on a tier change and when the pin changes (Reward tab)
    gr.on(None, on_choice, [tier, pinned], [reward_choice, unpin], **quiet)
    unpin.click(lambda: None, None, pinned, api_visibility="private")
    # a timer-driven refresh shows no "processing" overlay over the status every 2 s
    timer.tick(refresh, refresh_inputs, outputs, **quiet)
    algorithms.wire(studio, algorithm, algo, [settings_row, launch, compile_], tier, pinned, action, memory,
                    (refresh, refresh_inputs, outputs), pin_of)

    def adapter_choices(request: gr.Request = None):
        return gr.skip() if blind_view(studio, request) else gr.update(choices=policy_names(studio))
    return dict(on_load=(refresh, refresh_inputs, outputs), adapters=(adapter_choices, None),
                adapter_ids=adapter_ids, pinned=pinned,
                owner_only=[settings_row, tier, choice_row, compile_, launch_row, export_row, algorithm,
                            algo["launch_row"]])
