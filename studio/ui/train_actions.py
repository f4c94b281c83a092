"""The Train tab's handlers: functions of the studio, plain values (settings, ids, the pinned reward-model
version, what this browser tab was last sent) and the caller's request, returning the tab's outputs. train.py
lays the tab out and wires them."""
from __future__ import annotations

import gradio as gr

from .. import plots
from ..auth import require_owner, role_of
from ..errors import StudioError
from . import algorithms
from .common import blind_view, fail, md_text, ok, policy_names, unless_sent

# the PPO settings fields, in the order the handlers take them (the labels name an empty field)
SETTING_LABELS = ["Steps", "Prompts per step", "New tokens", "PPO epochs", "Learning rate", "KL coefficient β",
                  "LoRA rank", "Checkpoint every N steps", "Seed"]


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
             ("max_new_tokens", "new tokens"), ("ppo_epochs", "epochs"), ("lr", "lr"), ("kl_coef", "β"),
             ("lora_r", "LoRA r"), ("compile", "compile")]
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


# ------------------------------------------------------------------------------------------- the refresh
# the refresh's outputs, in order (train.py lists the components the same way)
REFRESH_OUTPUTS = ["status", "progress", "curves", "samples", "runs", "adapters", "resume_id", "export_id", "known",
                   "adapter_ids", "reward_choice", "unpin"]


def ppo_runs(studio):
    """This tab's runs: PPO only (deep reward-model updates are runs too; the Reward tab shows those)."""
    r = studio.runs()
    return r[r["kind"] == "ppo"] if len(r) else r


def choice_now(studio, tier, pinned, load_deep: bool) -> tuple:
    """(reward-choice line, unpin button); load_deep: look the deep tier up in the database (on a change), else
    only what is in memory (the 2 s refresh: skipped where that is unknown, to leave it as is)."""
    if pin_of(pinned) is None and tier != "fast":
        deep = studio.deep_reward_version(look_up=load_deep)
        if deep is None:
            return gr.skip(), gr.skip()
    else:
        deep = None
    return reward_choice_md(studio, tier, pinned, deep), gr.update(visible=pin_of(pinned) is not None)


def dropdown_lists(studio, raw_runs, raw_adapters, known) -> tuple:
    """(resume choices, export choices, what was sent now, adapter ids): the resume and export dropdowns (newest
    first), sent only when they changed since `known`."""
    resumable = []
    if len(raw_runs):
        busy = studio.running_ppo()
        for r in raw_runs.sort_values("id", ascending=False).itertuples():
            if r.status not in ("completed", "running", "queued") and int(r.id) != busy:
                resumable.append((f"run {int(r.id)} ({r.status})", int(r.id)))
    ads = [(f"adapter-{int(a.id)} (run {_cell(a.run_id)}, step {_cell(a.step)})", int(a.id))
           for a in raw_adapters.sort_values("id", ascending=False).itertuples()] if len(raw_adapters) else []
    now = {"resume": [list(c) for c in resumable], "export": [list(c) for c in ads]}
    old = known or {}
    up_resume = gr.skip() if old.get("resume") == now["resume"] else gr.update(
        choices=resumable, info="cancelled, failed or interrupted PPO runs" if resumable else
        "no cancelled, failed or interrupted PPO run to resume")
    up_export = gr.skip() if old.get("export") == now["export"] else gr.update(choices=ads)
    return up_resume, up_export, now, sorted(int(i) for i in raw_adapters["id"]) if len(raw_adapters) else []


def run_line(studio, rid: int, run: dict, metrics) -> tuple[str, float]:
    """(status line, progress %) of a run: its state, step of total, ETA while it runs, error and notes."""
    total = int(run["config"].get("steps", 1))
    done = int(metrics["step"].max()) if len(metrics) else 0
    eta = ""
    if len(metrics) >= 1 and run["status"] == "running" and "step_seconds" in metrics:
        eta = f" · ETA {metrics['step_seconds'].tail(5).mean() * (total - done):.0f} s"
    # error and notes as text: a message such as "<no compiler>" must not be taken for a tag
    err = f" — {md_text(run['error'])}" if run.get("error") else ""
    notes = "".join(f"\n\nNote: {md_text(n)}" for n in (run.get("notes") or "").splitlines())
    return f"Run **{rid}**: {run['status']} · step {done}/{total}{eta}{err}{notes}", 100.0 * done / max(total, 1)


def _run_outputs(studio, rid, old: dict, known: dict) -> list:
    """[status, progress, curves, samples] of the latest run (or of none), each sent only on a change."""
    if rid is None:
        return [*unless_sent(old, known, "status", "no run yet"), *unless_sent(old, known, "progress", 0),
                *unless_sent(old, known, "curves", None, plots.ppo_curves),
                *unless_sent(old, known, "samples", None, lambda _: empty_samples())]
    run = studio.run(rid)
    run["status"] = "paused" if run["status"] == "cancelled" and studio.watch_pause(rid) else run["status"]
    m = studio.run_metrics(rid)
    md, pct = run_line(studio, rid, run, m)
    done = int(m["step"].max()) if len(m) else 0

    def newest_samples(_):
        sm = studio.run_samples(rid)
        return sm.sort_values("step", ascending=False).head(12).round({"reward": 3}) if len(sm) else \
            empty_samples()
    return [*unless_sent(old, known, "status", md), *unless_sent(old, known, "progress", pct),
            *unless_sent(old, known, "curves", (rid, len(m)),
                         lambda _: algorithms.curves(m, run["config"].get("algorithm", "ppo"))),
            *unless_sent(old, known, "samples", (rid, done), newest_samples)]


def refresh(studio, tier="deep", pinned=None, known=None, request: gr.Request = None) -> list:
    """The REFRESH_OUTPUTS: every 2 s while the tab is open, and after each action. Builds and sends only what
    changed since this browser tab's last refresh (`known`): rebuilding the curves and tables every tick cost the
    app ~0.8 s a tick for nothing. Nothing for an annotator: runs, rewards and adapter names are the owner's."""
    if role_of(studio, request) != "owner":
        return [gr.skip()] * len(REFRESH_OUTPUTS)
    rid = studio.latest_ppo()
    raw_runs, raw_ads = ppo_runs(studio), studio.adapters()
    rs, ad = display_tables(raw_runs, raw_ads)
    up_resume, up_export, now, ids = dropdown_lists(studio, raw_runs, raw_ads, known)
    old = known or {}
    return [*_run_outputs(studio, rid, old, now),
            *unless_sent(old, now, "runs", rs.iloc[::-1] if rid is not None and len(rs) else rs),
            *unless_sent(old, now, "adapters", ad.iloc[::-1] if rid is not None and len(ad) else ad),
            up_resume, up_export, now, ids, *choice_now(studio, tier, pinned, load_deep=False)]


# ----------------------------------------------------------------------------------------------- actions
def on_launch(studio, steps, batch, new_tokens, epochs, lr, kl, lora_r, ckpt, seed, tier, compile_mode="off",
              pinned=None, request: gr.Request = None) -> str:
    """Launch PPO with these settings, on this browser tab's pinned reward-model version, else the latest of
    `tier`; the answer for the action line."""
    vals = [steps, batch, new_tokens, epochs, lr, kl, lora_r, ckpt, seed]
    try:
        require_owner(studio, request, "launch training")
    except StudioError as e:
        return fail(e)
    empty = [label for label, v in zip(SETTING_LABELS, vals) if v in (None, "")]
    if empty:
        return fail(f"invalid PPO settings: fill in {', '.join(empty)}")
    try:
        settings = ppo_settings(*vals, compile_mode)
    except (TypeError, ValueError) as e:
        return fail(f"invalid PPO settings: {e}")
    version = pin_of(pinned)
    try:
        h = studio.train_ppo(wait=False, reward_tier=tier if version is None else None,
                             reward_version=version, **settings)
    except StudioError as e:
        return fail(e)
    used = f"pinned reward-model version {version}" if version is not None else f"the latest {tier} tier"
    return ok(f"run {h.run_id} started in the background with {used} (closing this tab does not stop it)")


def on_cancel(studio, request: gr.Request = None) -> str:
    try:
        require_owner(studio, request, "cancel training")
        run_id = studio.cancel_ppo()
    except StudioError as e:
        return fail(e)
    return ok(f"cancelling run {run_id} at the next step boundary (it saves first)")


def on_resume(studio, rid, request: gr.Request = None) -> str:
    """Resume a cancelled, failed or interrupted run (a dropdown value, or typed: "3", "run 3")."""
    try:
        require_owner(studio, request, "resume training")
    except StudioError as e:
        return fail(e)
    if rid in (None, ""):
        return fail("choose a cancelled, failed or interrupted run to resume")
    try:
        h = studio.resume_ppo(_parse_id(rid, "the run id"))
    except (StudioError, LookupError, ValueError) as e:     # the facade's StudioError names a missing run
        return fail(e)
    return ok(f"run {h.run_id} resumed")


def on_export(studio, aid, path, merged, request: gr.Request = None) -> str:
    """Write an adapter (or the merged full model) to a folder in the studio's export folder."""
    try:
        require_owner(studio, request, "export adapters")
    except StudioError as e:
        return fail(e)
    if aid in (None, "") or not path:
        return fail("choose an adapter and enter a folder")
    try:
        adapter_id = _parse_id(aid, "the adapter id")
        p = studio.app_export_adapter(adapter_id, path, merged=bool(merged))
    except (StudioError, LookupError, ValueError) as e:     # the facade's StudioError names a missing adapter
        return fail(e)
    return ok(f"adapter {adapter_id} written to {p}")


def on_settings(studio, *vals) -> str:
    """The memory estimate. vals: the settings fields, the compile mode, then the reward tier (a trigger only:
    the same model size)."""
    try:
        return _memory_md(studio, ppo_settings(*vals[:len(SETTING_LABELS) + 1]))
    except (TypeError, ValueError) as e:
        return fail(e)


def on_choice(studio, tier, pinned) -> tuple:
    """Which reward model a launch uses, on a tier or pin change (the deep tier looked up in the database)."""
    return choice_now(studio, tier, pinned, load_deep=True)


def adapter_choices(studio, request: gr.Request = None):
    """The Generate tab's policy list (app.py wires it): unchanged in blind mode, where it shows no policy."""
    return gr.skip() if blind_view(studio, request) else gr.update(choices=policy_names(studio))
