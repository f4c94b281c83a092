"""Held-out evaluation of a policy against a baseline (issue 22).

Held-out prompts: a prompt is kept aside from training when the md5 of its text falls in one fifth of the hash
space (`hash_heldout`: stable across databases and sessions, ~20 % of any library), or when a user marked it
(`Studio.hold_out`, table heldout_prompts; evaluating on explicit prompts marks them too). PPO's prompt snapshot
leaves them out (`training_prompts`).

An evaluation samples one completion per prompt from each side with the same seed, stores both, and judges the
pair by the current reward model, by a Python callable, or by blind human votes queued to annotators (the side
shown first is drawn per pair). Its result is computed from the stored pairs and the current votes, so a human
evaluation fills in as votes arrive. Win rate: (wins + ties / 2) / judged, with a Wilson score 95% interval.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import random
from typing import Callable

import pandas as pd

from rlhf_studio.storage import records

from .errors import StudioError

HELDOUT_ONE_IN = 5           # one prompt in five is held out by its hash
Z95 = 1.959963984540054      # the standard normal's 97.5th percentile
JUDGE_ANSWERS = ("a", "b", "tie")


# ----------------------------------------------------------------------------------------- held-out prompts
def hash_heldout(text: str) -> bool:
    """Whether a prompt's text falls in the hash-held-out fifth (md5 of the UTF-8 text, first 32 bits mod 5)."""
    return int(hashlib.md5(str(text).encode("utf-8")).hexdigest()[:8], 16) % HELDOUT_ONE_IN == 0


def heldout_prompts(store) -> pd.DataFrame:
    """id, text, reason of every held-out prompt of the library ('hash', or the reason it was marked with)."""
    df = store.prompts()
    marks = store.heldout_marks()
    marked = dict(zip(marks["prompt_id"].astype(int), marks["reason"])) if len(marks) else {}
    rows = [(int(i), t, marked.get(int(i)) or "hash") for i, t in zip(df["id"], df["text"])
            if int(i) in marked or hash_heldout(t)]
    return pd.DataFrame(rows, columns=["id", "text", "reason"])


def training_prompts(store) -> tuple[list[str], str | None]:
    """The library's prompts that training may use, and a note when it had to fall back: where every prompt is
    held out, training uses them all (and says so) rather than refusing to train."""
    df = store.prompts()
    if not len(df):
        return [], None
    held = set(heldout_prompts(store)["id"])
    keep = [str(t) for i, t in zip(df["id"], df["text"]) if int(i) not in held]
    if keep:
        return keep, None
    return [str(t) for t in df["text"]], (
        f"every prompt of the library ({len(df)}) is held out for evaluation, so this run trains on all of them; "
        "add more prompts to keep a held-out set apart from training")


def _trained_prompts(store, adapter_id: int | None) -> set[str]:
    """The prompts the PPO run behind an adapter trained on (empty for the base model or an unknown run)."""
    if adapter_id is None:
        return set()
    run_id = store.adapter(int(adapter_id)).get("run_id")
    if run_id is None:
        return set()
    return set((store.run(int(run_id)).get("config") or {}).get("prompts") or [])


# ----------------------------------------------------------------------------------------- statistics
def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes/n (successes may be fractional: ties count half, which
    only lowers the true variance, so the interval stays on the safe side). (nan, nan) when n is 0."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(ev: dict, pairs: pd.DataFrame, votes: pd.DataFrame) -> dict:
    """An evaluation's result from its lineage row, its pairs and the human votes on them."""
    human = ev["judge"] == "human"
    outcomes = list(votes["outcome"]) if human else [w for w in pairs["judge_winner"] if isinstance(w, str)]
    wins, losses, ties = (outcomes.count(k) for k in ("policy", "baseline", "tie"))
    judged = wins + losses + ties
    lo, hi = wilson_interval(wins + ties / 2, judged)
    voted = set(votes["idx"]) if len(votes) else set()
    return dict(
        id=int(ev["id"]), policy=ev["policy"], baseline=ev["baseline"], judge=ev["judge"],
        criterion=ev["criterion"], reward_version=ev["reward_version"], pairs=len(pairs),
        pending=len(pairs) - len(voted) if human else 0, judged=judged, wins=wins, losses=losses, ties=ties,
        win_rate=(wins + ties / 2) / judged if judged else math.nan, ci_low=lo, ci_high=hi,
        policy_tokens=_mean(pairs["policy_tokens"]), baseline_tokens=_mean(pairs["baseline_tokens"]),
        policy_chars=_mean(pairs["policy_text"].str.len()), baseline_chars=_mean(pairs["baseline_text"].str.len()),
        **_agreement(pairs, votes), seed=int(ev["seed"]), created_at=ev["created_at"])


def _mean(s) -> float:
    s = pd.to_numeric(s, errors="coerce").dropna()
    return float(s.mean()) if len(s) else math.nan


def _agreement(pairs: pd.DataFrame, votes: pd.DataFrame) -> dict:
    """Share of the decisive human votes (a side won) where the reward model scored the same side higher; votes
    on pairs without reward scores, or with equal scores, are left out (agreement_n counts the votes used)."""
    if not len(votes) or not len(pairs):
        return dict(agreement=math.nan, agreement_n=0)
    scored = pairs.set_index("idx")[["policy_reward", "baseline_reward"]].dropna()
    agree = n = 0
    for idx, outcome in zip(votes["idx"], votes["outcome"]):
        if outcome == "tie" or idx not in scored.index:
            continue
        pr, br = scored.loc[idx]
        if pr == br:
            continue
        n += 1
        agree += (pr > br) == (outcome == "policy")
    return dict(agreement=agree / n if n else math.nan, agreement_n=n)


RESULT_COLUMNS = ["id", "policy", "baseline", "judge", "criterion", "reward_version", "pairs", "pending", "judged",
                  "wins", "losses", "ties", "win_rate", "ci_low", "ci_high", "policy_tokens", "baseline_tokens",
                  "policy_chars", "baseline_chars", "agreement", "agreement_n", "seed", "created_at"]


def evaluations_frame(store) -> pd.DataFrame:
    """One row per evaluation: lineage and result (see summarize), oldest first."""
    evs = store.evaluations()
    if not len(evs):
        return pd.DataFrame(columns=RESULT_COLUMNS)
    pairs, votes = store.evaluation_pairs(), store.evaluation_votes()
    rows = [summarize(ev, pairs[pairs["evaluation_id"] == ev["id"]], votes[votes["evaluation_id"] == ev["id"]])
            for ev in records(evs)]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


# ----------------------------------------------------------------------------------------- running one
def evaluate(studio, policy, baseline="base", prompts=None, judge="reward", n: int | None = None,
             criterion: str = "overall", seed: int = 0, max_new_tokens: int = 64, temperature: float = 0.8,
             top_p: float = 0.95) -> dict:
    """See Studio.evaluate."""
    judge_name = _judge_name(judge)
    if criterion not in set(studio.store.criteria()["name"]):
        raise StudioError(f"no criterion named {criterion!r}; add it first (s.add_criterion)")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise StudioError(f"seed must be a whole number, got {seed!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
        raise StudioError(f"n (how many prompts) must be a whole number of at least 1, got {n!r}")
    pol_id, _ = studio.jobs.activate_adapter(policy)
    base_id, _ = studio.jobs.activate_adapter(baseline)
    texts, explicit = _eval_prompts(studio.store, prompts, pol_id, base_id)
    texts = texts[:n] if n else texts
    if judge == "reward" and studio.reward.settings.criterion != criterion:
        raise StudioError(f"the reward model judges by {studio.reward.settings.criterion!r}, not {criterion!r}: "
                          "evaluate by its criterion, or use judge='human' for another one")
    if judge == "reward" and not _reward_ready(studio):
        raise StudioError("no reward model yet to judge with: give a few pairwise or star labels first, or use "
                          "judge='human'")
    rng = random.Random(seed)        # which side is shown (or passed to the judge) first, per pair
    pairs = []
    for i, text in enumerate(texts):
        kw = dict(n=1, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=int(seed) + i,
                  prompt_source="evaluation")
        a = studio.generate(text, adapter=pol_id, **kw)[0]
        b = studio.generate(text, adapter=base_id, **kw)[0]
        pairs.append(dict(prompt_id=a.prompt_id, seed=int(seed) + i, policy_completion_id=a.id,
                          baseline_completion_id=b.id, policy_first=rng.random() < 0.5, texts=(text, a.text, b.text)))
    if explicit:
        studio.store.mark_prompts_heldout([p["prompt_id"] for p in pairs], reason="evaluation")
    version = _score_pairs(studio, pairs)
    for p in pairs:
        p["judge_winner"] = _verdict(judge, p)
        del p["texts"]
    name = lambda aid: "base" if aid is None else f"adapter-{aid}"  # noqa: E731
    meta = dict(policy=name(pol_id), baseline=name(base_id), policy_adapter_id=pol_id, baseline_adapter_id=base_id,
                judge=judge_name, criterion=criterion, reward_version=version, seed=int(seed),
                model_id=studio.model_id, model_revision=studio.lm.revision,
                config=dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n,
                            prompts="given" if explicit else "held-out"))
    eid = studio.store.add_evaluation(meta, pairs)
    return result(studio.store, eid)


def result(store, evaluation_id: int) -> dict:
    """One evaluation's result as it stands now (human votes included)."""
    ev = store.evaluation(evaluation_id)
    return summarize(ev, store.evaluation_pairs(evaluation_id), store.evaluation_votes(evaluation_id))


def _judge_name(judge) -> str:
    if callable(judge):
        return f"callable:{getattr(judge, '__name__', type(judge).__name__)}"
    if judge in ("reward", "human"):
        return judge
    raise StudioError(f"judge must be 'reward', 'human' or a function (prompt, first, second) -> 'a' | 'b' | 'tie', "
                      f"got {judge!r}")


def _eval_prompts(store, prompts, pol_id, base_id) -> tuple[list[str], bool]:
    """(prompt texts, whether the caller gave them). By default the held-out prompts, less any that the runs
    behind either policy trained on (a run given explicit prompts may have used a held-out one)."""
    if prompts is not None:
        if isinstance(prompts, str) or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise StudioError("prompts must be a list of non-empty texts")
        texts = list(dict.fromkeys(prompts))
        if not texts:
            raise StudioError("prompts is empty: give at least one prompt, or None for the held-out prompts")
        return texts, True
    trained = _trained_prompts(store, pol_id) | _trained_prompts(store, base_id)
    texts = [t for t in heldout_prompts(store)["text"] if t not in trained]
    if not texts:
        raise StudioError("no held-out prompts to evaluate on: add prompts to the library (about one in five is "
                          "held out), mark some with s.hold_out([...]), or pass prompts=[...]")
    return texts, False


def _reward_ready(studio) -> bool:
    rs = studio.reward
    return rs.has_deep() or rs.fast_model() is not None


def _score_pairs(studio, pairs: list[dict]) -> int | None:
    """The current reward model's score of both sides of every pair (kept for the reward judge and for its
    agreement with human votes); returns its version, None where there is no reward model yet."""
    if not _reward_ready(studio):
        return None
    rs = studio.reward
    for p in pairs:
        p["policy_reward"] = rs.score(p["policy_completion_id"])[0]
        p["baseline_reward"] = rs.score(p["baseline_completion_id"])[0]
    return rs.deep_version if rs.has_deep() else rs.fast_version


def _verdict(judge, p: dict) -> str | None:
    """policy | baseline | tie from a non-human judge; None for 'human' (votes come later)."""
    if judge == "human":
        return None
    if judge == "reward":
        pr, br = p["policy_reward"], p["baseline_reward"]
        return "tie" if pr == br else ("policy" if pr > br else "baseline")
    prompt, pol, base = p["texts"]
    first, second = (pol, base) if p["policy_first"] else (base, pol)
    answer = _call_judge(judge, prompt, first, second)
    if answer == "tie":
        return "tie"
    return "policy" if (answer == "a") == p["policy_first"] else "baseline"


def _call_judge(judge: Callable, prompt: str, first: str, second: str) -> str:
    answer = judge(prompt, first, second)
    if answer not in JUDGE_ANSWERS:
        raise StudioError(f"the judge returned {answer!r}; it must return 'a' (the first completion is better), "
                          "'b' (the second) or 'tie'")
    return answer
