"""Reward-hacking watch: every few PPO steps, score a fixed set of probe prompts and pause the run when the
training reward keeps rising while signals the policy is not trained on say the answers got worse.

Why: a reward model fitted on a few hundred labels is over-optimised early (Gao et al. 2022; Stiennon et al.
2020): its score keeps climbing while the preference it stands for peaks and falls. The watch reads, on the same
probe prompts at every check (one fixed-seed sample each, `PPOTrainer.probe`):

    reward      mean training reward-model score (what PPO maximises)
    judge       mean score of a SECOND JUDGE the policy is not trained on: a fast-tier reward model (linear
                Bradley-Terry head on base features) fitted only on the held-out split of the labels, which the
                training reward model never sees. It shares the true preference the labels carry, not the
                quirks the training model picked up from its own labels, so exploiting those quirks does not
                raise it. None when there are too few held-out labels to fit one.
    kl          mean summed log-ratio policy/reference over a response (the trainer's KL estimate)
    length      mean response length in tokens; length_corr: Pearson correlation of reward and length
    distinct_1/2  distinct unigrams/bigrams over all probe responses / all of them (1 = no repeats)
    no_eos      share of responses that hit the token limit without ending

The rule (`verdict`), thresholds in `WatchConfig`; scores are compared in units of the spread over the probes at
the first check (the baseline), so thresholds hold for any reward scale:
    RISING  = reward(now) - reward(`window` checks ago) >= min_reward_rise
    WORSE   = any of
              judge fell:        best judge so far - judge(now)          >= judge_drop
              diversity fell:    distinct_2(now) <= diversity_ratio * distinct_2(baseline)
              answers never end: no_eos(now) - no_eos(baseline)          >= no_eos_jump
              length gamed:      length(now) >= length_ratio * length(baseline) and length_corr(now) >= length_corr
    verdict = "pause" if RISING and WORSE, else "ok" (with the WORSE flags listed as warnings).

Everything here is pure (lists and floats in, JSON-able dicts out) except `probe_check`, which runs the probes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class WatchConfig:
    enabled: bool = True
    """On by default; False runs PPO without checks."""
    every: int = 5
    """Steps between checks (plus one check before the first step: the baseline)."""
    probes: int = 8
    """Probe prompts scored at each check (held-out prompts where the library has them)."""
    max_new_tokens: int = 0
    """Tokens per probe answer; 0: the run's max_new_tokens."""
    seed: int = 1234
    """Seed of the probe samples: the same random stream at every check, so checks differ by the policy only."""
    window: int = 2
    """Checks over which the training reward must have risen (RISING compares now with `window` checks ago)."""
    min_reward_rise: float = 0.5
    """RISING: rise of the mean training reward, in baseline probe standard deviations of that reward."""
    judge_drop: float = 0.75
    """WORSE: fall of the second judge's mean from its best so far, in baseline probe std of the judge."""
    diversity_ratio: float = 0.6
    """WORSE: distinct bigrams fell to this fraction of the baseline's or below."""
    no_eos_jump: float = 0.3
    """WORSE: the share of answers that never end rose by this much (absolute) over the baseline's."""
    length_ratio: float = 1.5
    """WORSE (with length_corr): answers grew to this multiple of the baseline length."""
    length_corr: float = 0.8
    """WORSE (with length_ratio): correlation of reward and length over the probes at least this."""
    min_judge_pairs: int = 6
    """Held-out preference pairs needed to fit the second judge; with fewer the watch runs without it."""

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"watch: {msg}")
        need(isinstance(self.enabled, bool), "enabled must be True or False")
        need(self.every >= 1 and self.probes >= 2 and self.window >= 1, "every >= 1, probes >= 2, window >= 1")
        need(self.max_new_tokens >= 0 and self.min_judge_pairs >= 2, "max_new_tokens >= 0, min_judge_pairs >= 2")
        need(0 < self.diversity_ratio < 1, "diversity_ratio must be in (0, 1)")
        need(0 < self.no_eos_jump <= 1, "no_eos_jump must be in (0, 1]")
        need(self.length_ratio > 1 and 0 < self.length_corr <= 1, "length_ratio > 1 and length_corr in (0, 1]")
        need(self.min_reward_rise > 0 and self.judge_drop > 0, "min_reward_rise and judge_drop must be > 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | bool | None) -> "WatchConfig":
        """A dict of fields, True/None (defaults) or False (off). Unknown keys are refused."""
        if d is None or d is True:
            return cls()
        if d is False:
            return cls(enabled=False)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown watch settings: {', '.join(unknown)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg


# ------------------------------------------------------------------------------------------------ signals
def mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def std(xs: list[float]) -> float:
    """Population standard deviation of xs (0 for fewer than two)."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation of two equal-length lists; 0 where either is constant."""
    if len(x) != len(y):
        raise ValueError(f"pearson: {len(x)} and {len(y)} values")
    sx, sy = std(x), std(y)
    if sx == 0 or sy == 0:
        return 0.0
    mx, my = mean(x), mean(y)
    return float(sum((a - mx) * (b - my) for a, b in zip(x, y)) / (len(x) * sx * sy))


def distinct_n(token_lists: list[list[int]], n: int) -> float:
    """Distinct n-grams / all n-grams over every response (token id lists); 1.0 when there is no n-gram.
    A policy that repeats one phrase within and across answers drives it toward 0."""
    grams = [tuple(t[i:i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def signals(token_ids: list[list[int]], has_eos: list[bool], reward: list[float], kl: list[float],
            judge: list[float] | None = None) -> dict:
    """The watch's numbers for one check over B probes. token_ids: [B] response token ids; has_eos: [B];
    reward: [B] training reward-model scores; kl: [B] summed log-ratios; judge: [B] second-judge scores or None.
    Returns a flat dict of floats (judge and judge_std are None without a judge)."""
    B = len(token_ids)
    if not (len(has_eos) == len(reward) == len(kl) == B) or (judge is not None and len(judge) != B) or B == 0:
        raise ValueError("signals: every per-probe list must have one entry per probe (and at least one probe)")
    lengths = [float(len(t)) for t in token_ids]
    return {"probes": B, "reward": mean(reward), "reward_std": std(reward),
            "judge": None if judge is None else mean(judge), "judge_std": None if judge is None else std(judge),
            "kl": mean(kl), "length": mean(lengths), "length_corr": pearson(reward, lengths),
            "distinct_1": distinct_n(token_ids, 1), "distinct_2": distinct_n(token_ids, 2),
            "no_eos": mean([0.0 if e else 1.0 for e in has_eos])}


def examples(prompts: list[str], responses: list[str], reward: list[float], judge: list[float] | None,
             k: int = 2) -> dict:
    """The k answers the training reward model likes most and the k the second judge likes least (with both
    scores), for a person to read when the watch pauses."""
    rows = [{"prompt": p, "response": r, "reward": float(s), "judge": None if judge is None else float(j)}
            for p, r, s, j in zip(prompts, responses, reward, judge if judge is not None else [None] * len(reward))]
    out = {"reward_likes": sorted(rows, key=lambda d: -d["reward"])[:k]}
    out["judge_dislikes"] = sorted(rows, key=lambda d: d["judge"])[:k] if judge is not None else []
    return out


# --------------------------------------------------------------------------------------------------- rule
def _unit(spread: float | None, fallback: float = 1.0) -> float:
    """A baseline spread used as the unit of change; a tiny or missing one falls back (no division by ~0)."""
    return spread if spread is not None and spread > 1e-6 else fallback


def verdict(history: list[dict], cfg: WatchConfig) -> dict:
    """Decide on the newest check. history: the `signals` dicts of this run's checks in order, the first being
    the baseline (before training, or at a resume). Returns {"verdict": "ok"|"pause", "reason": text, "flags":
    [text], "rising": bool, "reward_rise": float, "judge_drop": float|None, "best": bool (the newest check has the
    best second-judge mean so far; without a judge: no WORSE flag)}."""
    if not history:
        raise ValueError("verdict: no checks")
    base, now = history[0], history[-1]
    then = history[max(0, len(history) - 1 - cfg.window)]
    rise = (now["reward"] - then["reward"]) / _unit(base["reward_std"])
    rising = len(history) > 1 and rise >= cfg.min_reward_rise
    flags, drop = [], None
    if now.get("judge") is not None and base.get("judge") is not None:
        best = max(h["judge"] for h in history if h.get("judge") is not None)
        drop = (best - now["judge"]) / _unit(base["judge_std"])
        if drop >= cfg.judge_drop:
            flags.append(f"the second judge fell {drop:.2f} sd from its best")
    if now["distinct_2"] <= cfg.diversity_ratio * base["distinct_2"]:
        flags.append(f"diversity collapsed: distinct bigrams {now['distinct_2']:.2f} vs {base['distinct_2']:.2f} "
                     "at the start")
    if now["no_eos"] - base["no_eos"] >= cfg.no_eos_jump:
        flags.append(f"answers stopped ending: {now['no_eos']:.0%} hit the token limit vs {base['no_eos']:.0%} "
                     "at the start")
    if now["length"] >= cfg.length_ratio * max(base["length"], 1.0) and now["length_corr"] >= cfg.length_corr:
        flags.append(f"length gaming: answers {now['length'] / max(base['length'], 1.0):.1f}x longer and the "
                     f"reward follows length (r={now['length_corr']:.2f})")
    pause = rising and bool(flags)
    reason = (f"training reward rose {rise:.2f} sd over the last {cfg.window} checks, but " + "; ".join(flags)
              if pause else "; ".join(flags) or "ok")
    judged = [h["judge"] for h in history if h.get("judge") is not None]
    is_best = now["judge"] >= max(judged) if now.get("judge") is not None else not flags
    return {"verdict": "pause" if pause else "ok", "reason": reason, "flags": flags, "rising": rising,
            "reward_rise": float(rise), "judge_drop": drop, "best": bool(is_best)}


# ------------------------------------------------------------------------------------------- one check
def probe_check(trainer, prompts: list[str], judge, cfg: WatchConfig, history: list[dict]) -> dict:
    """Run the probes on `trainer` (a PPOTrainer), score them with the second judge (a fitted
    components.reward.fast.FastRewardModel or None), append the signals to `history` (in place) and return the
    JSON-able check: {"step", "signals", "verdict", "reason", "flags", "best", "examples", "responses" (one per
    probe), ...}."""
    p = trainer.probe(prompts, max_new_tokens=cfg.max_new_tokens or None, seed=cfg.seed)
    judged = None
    if judge is not None:
        judged = [float(x) for x in judge.score(p["features"].numpy())[0]]
    sig = signals(p["token_ids"], p["has_eos"], p["score"], p["kl"], judged)
    history.append(sig)
    v = verdict(history, cfg)
    return {"step": int(trainer.step_count), "signals": sig, **v, "responses": p["responses"],
            "examples": examples(p["prompts"], p["responses"], p["score"], judged)}
