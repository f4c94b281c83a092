"""Label -> refreshed fast-tier scores, with ~10,000 labels in a real DuckDB file (issue 3: "under 1 s median").

What is measured: the wall time from a label made through the public API (`s.rate`, `s.compare`, `s.rank`,
`s.thumbs`) until `s.reward.visible_scores(ids)` returns the refreshed fast-tier scores of the completions on
screen (the prompt's completions): the label's verified write, the pair compiler (SQL view over every label),
the refit, the held-out metrics and the version row, i.e. what the user waits for.

Set-up (real everything; cached under artifacts/ so reruns skip it): the embedded SmolLM2-135M generates
`--per-prompt` completions for `--prompts` single-turn prompts of the real HH-RLHF test split (../shared/data),
their reward features are computed and cached in the DB by the app itself, and `--labels` labels are stored in
one verified transaction (storage.io.bulk) by 25 simulated annotators: pairwise (40 %, some ties), stars
(30 %), rankings of all completions of a prompt (15 %), thumbs (15 %), each drawn from a Bradley-Terry model
of a latent quality per completion (longer answers preferred, plus noise), so labels disagree as real ones do
and many supersede earlier ones.

Baseline, in the same process and interleaved label by label (so machine load hits both alike):
`settings.fast_refit = "full"`, the refit as it was before the incremental one: the pair rows stacked into
dense [n, F] matrices, a fresh model, Newton from zero (L2 re-chosen by CV when the pairs grew 25 %, reused in
between, as before). Candidate: `"incremental"` (the default): cached feature matrix, Newton warm-started from
the previous weights in completion space (components/reward/fast.py fit_indexed), held-out metrics per
completion. At the end both refit the same final pairs and their models are compared.

Optional `--synthetic-pairs N`: the worst case for the completion-space trick (every pair with its own two
completions, random features): a from-scratch fit vs a warm-started refit after 1 more pair.

    .venv/bin/python bench/bench_reward_latency.py                 # ~10 min the first time, then ~5
    .venv/bin/python bench/bench_reward_latency.py --timed 30 --baseline 10 --json artifacts/bench_reward_latency.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ANNOTATORS = [f"bench-{i:02d}" for i in range(25)]


def hh_prompts(k: int) -> list[str]:
    """The first k distinct single-turn human prompts (20..200 characters) of the real HH-RLHF test file."""
    from rlhf_studio.storage.io.preferences import read_hh as parse_hh
    from tests.data_paths import HH_REAL
    out: list[str] = []
    for row in parse_hh(HH_REAL):
        p = row["prompt"]
        if p.count("Human:") != 1:
            continue
        text = p.split("Human:", 1)[1].rsplit("Assistant:", 1)[0].strip()
        if 20 <= len(text) <= 200 and text not in out:
            out.append(text)
        if len(out) == k:
            break
    if len(out) < k:
        raise SystemExit(f"only {len(out)} suitable prompts in {HH_REAL}")
    return out


def build_seed(path: Path, lm, n_prompts: int, per_prompt: int, n_labels: int, seed: int) -> None:
    from rlhf_studio.storage.io.bulk import add_feedback_many
    from rlhf_studio import Studio
    t0 = time.perf_counter()
    s = Studio(str(path), model=lm)
    s.reward.settings.deep_every = 0
    try:
        for i, p in enumerate(hh_prompts(n_prompts)):
            s.generate(p, n=per_prompt, max_new_tokens=40, temperature=0.9, seed=seed + i)   # + features
            if (i + 1) % 10 == 0:
                print(f"  generated {i + 1}/{n_prompts} prompts x {per_prompt} (with features), "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
        comps = s.completions()
        rng = np.random.default_rng(seed)
        by_prompt = {int(pid): [int(c) for c in g["id"]] for pid, g in comps.groupby("prompt_id")}
        length = np.log1p(comps["text"].str.len().to_numpy(dtype=float))
        latent = dict(zip(comps["id"].astype(int), (length - length.mean()) / (length.std() + 1e-9)
                          + 0.7 * rng.normal(size=len(comps))))
        rows = [label_row(rng, by_prompt, latent, rng.choice(ANNOTATORS))[1] for _ in range(n_labels)]
        t1 = time.perf_counter()
        add_feedback_many(s.store, rows)
        print(f"  stored {n_labels} labels in one verified transaction in {time.perf_counter() - t1:.1f} s",
              flush=True)
    finally:
        s.close()
    print(f"  seed DB built in {time.perf_counter() - t0:.0f} s: {path}", flush=True)


def label_row(rng, by_prompt: dict, latent: dict, annotator: str) -> tuple[int, dict]:
    """(prompt id, one simulated label): kind by the mix, outcome from a Bradley-Terry model of the latent
    quality (Gumbel noise: the best of a set is picked with softmax probabilities)."""
    pid = int(rng.choice(list(by_prompt)))
    cs = by_prompt[pid]
    noisy = {c: latent[c] + rng.gumbel() for c in cs}
    kind = rng.choice(["pairwise", "stars", "ranking", "thumbs"], p=[0.4, 0.3, 0.15, 0.15])
    meta = {"annotator": str(annotator), "source": "human"}
    if kind == "pairwise":
        a, b = (int(x) for x in rng.choice(cs, 2, replace=False))
        winner = "tie" if abs(noisy[a] - noisy[b]) < 0.2 else ("a" if noisy[a] > noisy[b] else "b")
        return pid, {"kind": "pairwise", "completion_id": a, "other_completion_id": b, "winner": winner, **meta}
    if kind == "stars":
        c = int(rng.choice(cs))
        return pid, {"kind": "stars", "completion_id": c, "stars": int(np.clip(round(3 + noisy[c]), 1, 5)), **meta}
    if kind == "ranking":
        return pid, {"kind": "ranking", "ranking": sorted(cs, key=lambda c: -noisy[c]), **meta}
    c = int(rng.choice(cs))
    return pid, {"kind": "thumbs", "completion_id": c, "up": bool(noisy[c] > 0.3), **meta}


def api_label(s, rng, by_prompt: dict, latent: dict) -> tuple[str, list[int], callable]:
    """A live label through the public API (annotator 'live'); returns (kind, visible ids, the call)."""
    pid, row = label_row(rng, by_prompt, latent, "live")
    visible = by_prompt[pid]
    kind = row["kind"]
    if kind == "pairwise":
        return kind, visible, lambda: s.compare(row["completion_id"], row["other_completion_id"], row["winner"],
                                                annotator="live")
    if kind == "stars":
        return kind, visible, lambda: s.rate(row["completion_id"], row["stars"], annotator="live")
    if kind == "ranking":
        return kind, visible, lambda: s.rank(row["ranking"], annotator="live")
    return kind, visible, lambda: s.thumbs(row["completion_id"], row["up"], annotator="live")


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def synthetic(n: int, F: int = 1152, seed: int = 0) -> dict:
    """Worst case for the completion-space Hessian: every pair has its own two completions."""
    from rlhf_studio.components.reward.fast import FastRewardModel
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=F) / math.sqrt(F)
    X = rng.normal(size=(2 * n + 2, F)).astype(np.float32)
    a, b = np.arange(0, 2 * n + 2, 2), np.arange(1, 2 * n + 2, 2)
    win = rng.random(n + 1) < 1 / (1 + np.exp(-3 * (X[a] - X[b]) @ w_true))
    ci, ri = np.where(win, a, b), np.where(win, b, a)
    l2 = 0.1 * F
    t0 = time.perf_counter()
    prev = FastRewardModel().fit(X[ci[:n]], X[ri[:n]], l2=l2)
    t_prev = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = FastRewardModel().fit(X[ci], X[ri], l2=l2)
    t_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    inc = FastRewardModel().fit_indexed(X, ci, ri, l2=l2, warm_start=prev)
    t_inc = time.perf_counter() - t0
    diff = float(np.abs(inc.weight - full.weight).max() / np.abs(full.weight).max())
    return {"pairs": n + 1, "features": F, "first_fit_s": t_prev, "full_refit_s": t_full,
            "incremental_refit_s": t_inc, "ratio": t_full / t_inc, "max_rel_weight_diff": diff}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--per-prompt", type=int, default=5)
    ap.add_argument("--labels", type=int, default=10_000)
    ap.add_argument("--timed", type=int, default=30, help="labels timed with the incremental refit")
    ap.add_argument("--baseline", type=int, default=10, help="labels timed with the full refit (baseline)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(ROOT / "artifacts" / "bench_reward_latency"))
    ap.add_argument("--synthetic-pairs", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    from rlhf_studio.components.models import load_model
    from rlhf_studio.components.reward.fast import FastRewardModel
    from rlhf_studio import Studio

    print(f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}", flush=True)
    lm = load_model("embedded")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    seed_db = cache / f"seed-{args.prompts}x{args.per_prompt}-{args.labels}-s{args.seed}.duckdb"
    if not seed_db.exists():
        print(f"building {seed_db.name} (generation + features + labels, once)", flush=True)
        tmp = seed_db.with_suffix(".building")
        for f in (tmp, Path(str(tmp) + ".wal")):
            f.unlink(missing_ok=True)
        build_seed(tmp, lm, args.prompts, args.per_prompt, args.labels, args.seed)
        tmp.rename(seed_db)
        if Path(str(tmp) + ".wal").exists():
            Path(str(tmp) + ".wal").rename(str(seed_db) + ".wal")
    work = Path(tempfile.mkdtemp(prefix="bench_reward_latency_"))
    db = work / "run.duckdb"
    shutil.copy(seed_db, db)
    if Path(str(seed_db) + ".wal").exists():
        shutil.copy(str(seed_db) + ".wal", str(db) + ".wal")
    out: dict = {"device": "cpu", "torch_threads": torch.get_num_threads()}
    s = Studio(str(db), model=lm)
    try:
        s.reward.settings.deep_every = 0
        comps = s.completions()
        by_prompt = {int(pid): [int(c) for c in g["id"]] for pid, g in comps.groupby("prompt_id")}
        rng = np.random.default_rng(args.seed + 1)
        length = np.log1p(comps["text"].str.len().to_numpy(dtype=float))
        latent = dict(zip(comps["id"].astype(int), (length - length.mean()) / (length.std() + 1e-9)
                          + 0.7 * rng.normal(size=len(comps))))
        # The app has been running: one refit of each kind, not timed as labels. Each re-chooses L2 by CV
        # (as a refit does when the training pairs grew by 25 %, i.e. rarely at 10,000 labels): reported apart.
        out["cv_refit_s"] = {}
        for mode in ("full", "incremental"):
            s.reward.settings.fast_refit = mode
            s.reward.fast_l2 = None
            t0 = time.perf_counter()
            s.reward.refit_fast(store_weights=True)
            out["cv_refit_s"][mode] = time.perf_counter() - t0
            print(f"warm-up refit ({mode}, with CV of L2): {out['cv_refit_s'][mode]:.2f} s", flush=True)
        times: dict[str, list[float]] = {"incremental": [], "full": []}
        stages: list[dict] = []
        kinds: dict[str, int] = {}
        for r in range(max(args.timed, args.baseline)):
            order = ("incremental", "full") if r % 2 == 0 else ("full", "incremental")
            for mode in order:
                if len(times[mode]) >= (args.timed if mode == "incremental" else args.baseline):
                    continue
                s.reward.settings.fast_refit = mode
                kind, visible, call = api_label(s, rng, by_prompt, latent)
                before = s.reward.fast_version
                t0 = time.perf_counter()
                call()
                scores = s.reward.visible_scores(visible)
                dt = time.perf_counter() - t0
                if s.reward.fast_version == before or any(x is None for x in scores):
                    raise SystemExit(f"the {mode} refit did not refresh the scores: {s.reward.last_error}")
                times[mode].append(dt)
                if mode == "incremental":
                    kinds[kind] = kinds.get(kind, 0) + 1
                    stages.append(dict(s.reward.last_refit))
                print(f"  {mode:11s} {kind:8s} {dt * 1000:8.0f} ms", flush=True)

        # the same final pairs through both refits: same model?
        s.reward.settings.fast_refit = "incremental"
        s.reward.refit_fast()
        inc = s.reward.fast
        pairs = s.reward.pairs()
        train = pairs[~pairs["heldout"]]
        test = pairs[pairs["heldout"]]
        feats = s.reward.features(list(comps["id"]))
        X = np.stack([feats[int(i)] for i in comps["id"]])
        Xc = np.stack([feats[int(i)] for i in train["chosen_id"]])
        Xr = np.stack([feats[int(i)] for i in train["rejected_id"]])
        t0 = time.perf_counter()
        ref = FastRewardModel().fit(Xc, Xr, l2=inc.l2)          # from scratch, dense rows, the same L2
        t_ref = time.perf_counter() - t0
        # how much of the gain is threads alone: the same from-scratch fit on one thread
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        FastRewardModel().fit(Xc, Xr, l2=inc.l2)
        t_ref1 = time.perf_counter() - t0
        torch.set_num_threads(prev_threads)
        si, sr = inc.score(X), ref.score(X)
        Tc = np.stack([feats[int(i)] for i in test["chosen_id"]])
        Tt = np.stack([feats[int(i)] for i in test["rejected_id"]])
        ev_i, ev_r = inc.evaluate(Tc, Tt), ref.evaluate(Tc, Tt)
        stats = s.store.stats()
        quality = {
            "max_abs_score_diff": float(np.abs(si[0] - sr[0]).max()),
            "score_sd": float(sr[0].std()),
            "max_rel_std_diff": float((np.abs(si[1] - sr[1]) / sr[1]).max()),
            "max_rel_weight_diff": float(np.abs(inc.weight - ref.weight).max() / np.abs(ref.weight).max()),
            "heldout_accuracy": {"incremental": ev_i["accuracy"], "from_scratch": ev_r["accuracy"]},
            "heldout_loss": {"incremental": ev_i["loss"], "from_scratch": ev_r["loss"]},
            "from_scratch_fit_s": t_ref, "from_scratch_fit_1thread_s": t_ref1, "incremental_fit_s": inc.fit_seconds,
        }
        inc_t, base_t = times["incremental"], times["full"]
        out.update({
            "labels": stats["feedback"], "pairs": len(pairs), "train_pairs": len(train), "heldout_pairs": len(test),
            "distinct_train_pairs": int(train[["chosen_id", "rejected_id"]].drop_duplicates().shape[0]),
            "completions": stats["completions"], "live_label_kinds": kinds,
            "incremental": {"n": len(inc_t), "median_s": statistics.median(inc_t), "p99_s": pct(inc_t, 99),
                            "mean_s": statistics.fmean(inc_t), "max_s": max(inc_t)},
            "baseline_full": {"n": len(base_t), "median_s": statistics.median(base_t), "p99_s": pct(base_t, 99),
                              "mean_s": statistics.fmean(base_t), "max_s": max(base_t)},
            "stage_median_s": {k: statistics.median(d[k] for d in stages)
                               for k in ("pairs", "features", "fit", "evaluate", "store", "total")},
            "quality": quality,
        })
        out["ratio_median"] = out["baseline_full"]["median_s"] / out["incremental"]["median_s"]
        out["ratio_p99"] = out["baseline_full"]["p99_s"] / out["incremental"]["p99_s"]
    finally:
        s.close()
        shutil.rmtree(work, ignore_errors=True)
    if args.synthetic_pairs:
        out["synthetic"] = synthetic(args.synthetic_pairs)

    i, b = out["incremental"], out["baseline_full"]
    print()
    print(f"DB: {out['labels']} labels, {out['completions']} completions, {out['pairs']} pairs "
          f"({out['train_pairs']} train, {out['distinct_train_pairs']} distinct; {out['heldout_pairs']} held out)")
    print(f"label -> refreshed fast-tier scores, incremental ({i['n']} labels {out['live_label_kinds']}): "
          f"median {i['median_s'] * 1000:.0f} ms, p99 {i['p99_s'] * 1000:.0f} ms, max {i['max_s'] * 1000:.0f} ms")
    print(f"baseline full refit ({b['n']} labels, same process, interleaved): "
          f"median {b['median_s'] * 1000:.0f} ms, p99 {b['p99_s'] * 1000:.0f} ms")
    print(f"RATIO baseline/incremental: median {out['ratio_median']:.1f}x, p99 {out['ratio_p99']:.1f}x")
    print(f"refit that re-chooses L2 by CV (when train pairs grew 25 %): incremental "
          f"{out['cv_refit_s']['incremental']:.2f} s, full {out['cv_refit_s']['full']:.2f} s")
    print("incremental stage medians (s): " + ", ".join(f"{k} {v:.3f}" for k, v in out["stage_median_s"].items()))
    q = out["quality"]
    print(f"same model? final pairs, incremental vs from-scratch fit at the same L2: max |score diff| "
          f"{q['max_abs_score_diff']:.2e} (score sd {q['score_sd']:.3f}), max rel std diff "
          f"{q['max_rel_std_diff']:.2e}, max rel weight diff {q['max_rel_weight_diff']:.2e}; held-out acc "
          f"{q['heldout_accuracy']['incremental']:.4f} vs {q['heldout_accuracy']['from_scratch']:.4f}")
    print(f"fit alone on the final pairs: incremental {q['incremental_fit_s']:.3f} s; from scratch "
          f"{q['from_scratch_fit_s']:.2f} s ({out['torch_threads']} threads), {q['from_scratch_fit_1thread_s']:.2f} s "
          f"(1 thread)")
    if "synthetic" in out:
        sy = out["synthetic"]
        print(f"synthetic worst case ({sy['pairs']} pairs, each with its own 2 completions, F={sy['features']}): "
              f"from-scratch refit {sy['full_refit_s']:.2f} s, warm-started {sy['incremental_refit_s']:.2f} s "
              f"(RATIO {sy['ratio']:.1f}x), max rel weight diff {sy['max_rel_weight_diff']:.1e}")
    print(f"1 s median target at {out['labels']} labels: "
          f"{'MET' if i['median_s'] < 1.0 else 'NOT MET'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
