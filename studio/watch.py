"""The reward-hacking watch in the studio: what a PPO job needs to run it (probe prompts, a second judge), the
job's side of a check, and the app's side (store every check, keep the best policy, pause, roll back, audit).

The rule and the signals live in components/training/watch.py. Here:
- probes: library prompts the run does not train on where there are enough of them, else the first training
  prompts in a fixed hash order (the check says so); stored with the run, so a resume probes the same prompts.
- second judge: a fast-tier reward model fitted on the held-out split of the labels only (the `heldout` ~20% of
  `preference_pairs`, which neither reward tier trains on), fitted once per run and stored (`watch_judges`).
- best check: the highest second-judge mean so far (without a judge, the newest check with no warning); the job
  sends the policy adapter with it and the app keeps it on that check's row, for `rollback`.
"""
from __future__ import annotations

import hashlib
import logging
import random

import numpy as np

from rlhf_studio.components.training.watch import WatchConfig, probe_check

from .errors import StudioError

log = logging.getLogger("rlhf_studio.watch")


# ------------------------------------------------------------------------------------ app: before the job
def parse_config(watch) -> WatchConfig:
    """`s.train_ppo(watch=...)`: None/True (defaults), False (off) or a dict of WatchConfig fields."""
    try:
        return WatchConfig.from_dict(watch)
    except (TypeError, ValueError) as e:
        raise StudioError(f"invalid watch settings: {e}") from None


def probe_prompts(library: list[str], train_prompts: list[str], n: int) -> tuple[list[str], str | None]:
    """(probe prompts, note or None): n library prompts outside the training prompts, else n training prompts.
    The choice is by a hash of the text, so the same library gives the same probes."""
    order = lambda ps: sorted(dict.fromkeys(ps), key=lambda p: hashlib.sha256(p.encode()).hexdigest())  # noqa
    train = set(train_prompts)
    held = order([p for p in library if p not in train])
    if len(held) >= n:
        return held[:n], None
    return order(train_prompts)[:n], (f"the watch probes {min(n, len(train))} training prompts: the library has "
                                      f"only {len(held)} prompts the run does not train on")


def fit_second_judge(studio, min_pairs: int) -> tuple[bytes | None, int, str | None]:
    """(FastRewardModel bytes or None, held-out pairs used, note): the second judge, fitted on held-out labels."""
    from rlhf_studio.components.reward.fast import FastRewardModel
    from .reward_service import bt_margins
    pairs = studio.reward.pairs()
    held = pairs[pairs["heldout"]] if len(pairs) else pairs
    if len(held):
        feats = studio.reward.features(list(held["chosen_id"]) + list(held["rejected_id"]))
        held = held[held["chosen_id"].isin(feats.keys()) & held["rejected_id"].isin(feats.keys())]
    if len(held) < min_pairs:
        return None, len(held), (f"the watch runs without a second judge: {len(held)} held-out preference pairs, "
                                 f"it needs {min_pairs}")
    Xc = np.stack([feats[int(i)] for i in held["chosen_id"]])
    Xr = np.stack([feats[int(i)] for i in held["rejected_id"]])
    model = FastRewardModel().fit(Xc, Xr, margin=bt_margins(held["margin"].to_numpy()))
    return model.to_bytes(), len(held), None


def job_spec(studio, run_id: int, run_config: dict) -> dict | None:
    """The `watch` part of a PPO job's spec, or None when the watch is off or the run is shorter than one check
    interval. Fits (first start) or reloads (resume) the run's second judge; notes go to the run's notes."""
    store = studio.store
    cfg = WatchConfig.from_dict(run_config.get("watch"))
    if not cfg.enabled or "watch_probes" not in run_config or int(run_config.get("steps", 0)) < cfg.every:
        return None         # off, a run from before the watch, or too short for one check
    notes = list(run_config.get("watch_notes") or [])
    judge = store.watch_judge(run_id)
    if judge is None:
        try:
            blob, n, note = fit_second_judge(studio, cfg.min_judge_pairs)
        except Exception as e:  # noqa: BLE001 - the watch's other signals still run; the note says why
            log.warning("run %s: second judge not fitted: %s", run_id, e)
            blob, n, note = None, 0, f"the watch runs without a second judge: fitting it failed ({e})"
        if blob is not None:
            store.put_watch_judge(run_id, blob, n)
            judge = (blob, n)
        notes += [note] if note else []
    for note in notes:
        store.add_run_note(run_id, note)
    checks = store.watch_checks(run_id)
    judged = checks["judge"].dropna() if "judge" in checks.columns else []
    return {"config": cfg.to_dict(), "probes": run_config["watch_probes"], "judge": judge[0] if judge else None,
            "best_judge": float(max(judged)) if len(judged) else None}


# ------------------------------------------------------------------------------------------------ the job
class JobWatch:
    """The job's side: checks every `every` steps (and once before training or at a resume: the baseline)."""

    def __init__(self, spec: dict):
        from rlhf_studio.components.reward.fast import FastRewardModel
        self.cfg = WatchConfig.from_dict(spec["config"])
        self.prompts = list(spec["probes"])
        self.judge = FastRewardModel.from_bytes(spec["judge"]) if spec.get("judge") else None
        self.best_judge = spec.get("best_judge")
        self.history: list[dict] = []

    def due(self, step: int) -> bool:
        return not self.history or step % self.cfg.every == 0

    def check(self, trainer) -> dict:
        """One check as a JSON-able message body (plain types and bytes): the policy adapter rides along when
        this check is the best so far."""
        from .jobs import adapter_zip
        c = probe_check(trainer, self.prompts, self.judge, self.cfg, self.history)
        judge = c["signals"]["judge"]
        if judge is not None:
            c["best"] = self.best_judge is None or judge > self.best_judge
            self.best_judge = judge if c["best"] else self.best_judge
        c["adapter"] = adapter_zip(trainer) if c["best"] else None
        return c


# -------------------------------------------------------------------------------------- app: during the job
def record(store, run_id: int, check: dict) -> None:
    """Store a check the job sent."""
    store.add_watch_check(run_id, int(check["step"]), check["verdict"], check.get("reason"), check["signals"],
                          examples=check.get("examples"), best=bool(check.get("best")), adapter=check.get("adapter"))


# --------------------------------------------------------------------------------------- app: after a pause
def rollback(studio, run_id: int) -> int:
    """A new adapter from the run's best check (by the second judge); returns its id."""
    best = studio.store.watch_best_adapter(int(run_id))
    if best is None:
        raise StudioError(f"run {run_id} has no watch check with a kept policy to roll back to")
    step, blob = best
    lm = studio.lm
    return studio.store.add_adapter(name=f"ppo-run{run_id}-best-step{step}", weights=blob,
                                    config={"run_id": int(run_id), "rollback_to_step": step},
                                    base_model_id=lm.model_id, base_revision=lm.revision, run_id=int(run_id),
                                    step=step)


def current_adapter(studio, run_id: int) -> int:
    ads = studio.store.adapters()
    ads = ads[(ads["run_id"] == int(run_id)) & ~ads["name"].str.contains("-best-step")] if len(ads) else ads
    if not len(ads):
        raise StudioError(f"run {run_id} has no adapter yet")
    return int(ads["id"].iloc[-1])


def audit(studio, run_id: int, n: int = 4, max_new_tokens: int = 48, seed: int = 0) -> list[dict]:
    """A short blind audit: n probe prompts answered by the run's current policy and by its best checkpoint
    (rolled back to an adapter), each pair in a random order. Returns [{prompt, a, b, a_text, b_text}]: vote with
    `studio.compare(a, b, winner)` like any pairwise label (it trains the reward model); which side was which is
    in the completions' adapter ids, shown after the vote."""
    run = studio.store.run(int(run_id))
    probes = list((run["config"] or {}).get("watch_probes") or [])[:int(n)]
    if not probes:
        raise StudioError(f"run {run_id} has no watch probes to audit")
    now, best = current_adapter(studio, run_id), rollback(studio, run_id)
    rng, out = random.Random(f"{run_id}:{seed}"), []
    for p in probes:
        pair = [studio.generate(p, n=1, max_new_tokens=max_new_tokens, adapter=a, seed=seed,
                                prompt_source="watch-audit")[0] for a in (now, best)]
        rng.shuffle(pair)
        out.append({"prompt": p, "a": pair[0].id, "b": pair[1].id, "a_text": pair[0].text, "b_text": pair[1].text})
    return out
