"""The whole loop against a simulated annotator whose preference is a known Python rule over the text.

Through the public Studio API only: generate completions of training prompts, label them by the rule (stars and
pairwise choices, the pairs picked by "suggest what to label next"), fit the fast reward model, run PPO, then
judge base against policy on held-out prompts by the same rule (same seeds for both sides). Per preference it
prints: labels used, the held-out win rate of the policy over the base (ties count one half; 95% interval), the
win rate when both answers are cut to the same number of words (a gain that length alone explains vanishes
there), the final KL, the reward model's held-out accuracy and the time. `--active` also counts the labels that
suggested pairs and randomly chosen pairs need to reach a held-out reward-model accuracy, over seeds.

    PYTHONPATH=$PWD python bench/bench_loop.py                          # every preference, full size
    PYTHONPATH=$PWD python bench/bench_loop.py --quick --prefs exclaim  # one preference, small and short
    PYTHONPATH=$PWD python bench/bench_loop.py --active --seeds 0 1 2   # suggested vs random pairs only
    PYTHONPATH=$PWD python bench/bench_loop.py --algorithm rloo --ppo lr=1e-3 k=4   # RLOO/GRPO through s.train
    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python bench/bench_loop.py --thread-probe    # one vs two threads here

The table in docs/LEARNING.md gives the exact command of each figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import tempfile
import time
from pathlib import Path

TRAIN_PROMPTS = [
    "Give me tips for writing a clear email.", "How can I sleep better?", "Suggest a weekend hobby.",
    "How do I stay focused while studying?", "What should I cook tonight?", "How do I make my code faster?",
    "Recommend a book for a long flight.", "Name a healthy breakfast.", "How do I boil an egg?",
    "Tell me a fun fact about octopuses.", "Why is the sky blue?", "What is inflation?",
    "Explain photosynthesis to a child.", "How do plants drink water?", "What is a black hole?",
    "Give a motivational quote.", "Describe the smell of rain.", "Why do cats purr?",
    "How do I keep my houseplants alive?", "What are good habits for a morning routine?",
    "How can I be more productive at work?", "Plan a day trip to the seaside.", "How do I learn to cook?",
    "What should I pack for a camping trip?", "How do I make friends in a new city?",
    "Explain how a rainbow forms.", "How do I write a good cover letter?", "What is a healthy lunch?",
    "How can I reduce stress?", "Suggest a game to play with kids.", "How do I clean a cast iron pan?",
    "What is the water cycle?",
]
HELDOUT_PROMPTS = [
    "How do I water a cactus?", "Give me a tip for public speaking.", "What is a good gift for a friend?",
    "Why do leaves change colour?", "How do airplanes fly?", "What is the best way to learn a language?",
    "How do I start running?", "How can I save money?", "What do penguins eat?", "How do I fold a paper plane?",
    "How do I organise my desk?", "What is a good snack for a movie night?", "How do I care for a puppy?",
    "Suggest a name for a bakery.", "How can I drink more water?", "What makes a good team leader?",
]


# ---------------------------------------------------------------------------------------------------- preferences
def n_list_lines(text: str) -> float:
    """format: lines that are items of a bulleted or numbered list."""
    return float(len(re.findall(r"(?m)^\s*(?:[-*\u2022]|\d+[.)])\s+\S", text)))


def n_numbers(text: str) -> float:
    """content: concrete figures (numbers written with digits)."""
    return float(min(len(re.findall(r"\d+", text)), 3))


def n_exclamations(text: str) -> float:
    """style: enthusiasm (exclamation marks)."""
    return float(min(text.count("!"), 3))


PREFERENCES = {"list": n_list_lines, "numbers": n_numbers, "exclaim": n_exclamations}


def stars_of(value: float) -> int:
    return 2 if value <= 0 else 4 if value < 2 else 5


def judge(rule, a: str, b: str) -> float:
    """1 if the rule prefers a, 0 if b, 1/2 for a tie."""
    ra, rb = rule(a), rule(b)
    return 1.0 if ra > rb else 0.0 if ra < rb else 0.5


def cut_to_same_length(a: str, b: str) -> tuple[str, str]:
    """Both texts cut to the word count of the shorter (line breaks kept, so that list lines still count)."""
    n = min(len(a.split()), len(b.split()))
    return _first_words(a, n), _first_words(b, n)


def _first_words(text: str, n: int) -> str:
    spans = [m.end() for m in re.finditer(r"\S+", text)]
    return text[:spans[n - 1]] if n and spans else ""


def mean_interval(xs: list[float]) -> tuple[float, float, float]:
    """Mean and a 95% normal interval of the mean (clipped to [0, 1])."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1))
    h = 1.96 * sd / math.sqrt(len(xs))
    return m, max(0.0, m - h), min(1.0, m + h)


# ------------------------------------------------------------------------------------------------- the annotator
def label_by_rule(s, rule, prompts, a) -> int:
    """Generate a.n completions per prompt, star them all, then answer a.pairs suggested (or random) pairs.
    Returns the number of labels given."""
    labels = 0
    rng = random.Random(a.seed)
    by_prompt = {}
    for i, p in enumerate(prompts):
        cs = s.generate(p, n=a.n, max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed * 1000 + i)
        by_prompt[cs[0].prompt_id] = cs
        for c in cs[:a.stars]:
            s.rate(c.id, stars_of(rule(c.text)))
            labels += 1
    texts = {c.id: c.text for cs in by_prompt.values() for c in cs}
    for _ in range(a.pairs):
        pair = pick_pair(s, by_prompt, rng, a.choice)
        if pair is None:
            break
        w = judge(rule, texts[pair[0]], texts[pair[1]])
        s.compare(pair[0], pair[1], winner={1.0: "a", 0.0: "b", 0.5: "tie"}[w])
        labels += 1
    return labels


def pick_pair(s, by_prompt, rng, choice: str):
    if choice == "suggest":
        sug = s.suggest_pair()
        return None if sug is None else (sug["a"], sug["b"])
    fb = s.feedback()
    labelled = {(int(r.completion_id), int(r.other_completion_id)) for r in fb.itertuples()
                if r.other_completion_id == r.other_completion_id and r.other_completion_id is not None}
    for _ in range(100):
        cs = by_prompt[rng.choice(list(by_prompt))]
        x, y = rng.sample(cs, 2)
        if (x.id, y.id) not in labelled and (y.id, x.id) not in labelled:
            return x.id, y.id
    return None


def heldout_rm_accuracy(s, rule, pool) -> float:
    """Share of held-out pairs with a strict rule preference that the current reward model orders the same way."""
    from rlhf_studio import StudioError
    right = total = 0
    scores = {}
    for p, texts in pool:
        for t in texts:
            try:
                scores[(p, t)] = s.score_text(p, t)[0]
            except StudioError:         # no reward model yet (too few untied pairs): it orders nothing
                return float("nan")
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                w = judge(rule, texts[i], texts[j])
                if w == 0.5:
                    continue
                d = scores[(p, texts[i])] - scores[(p, texts[j])]
                right += (d > 0) == (w == 1.0)
                total += 1
    return right / total if total else float("nan")


# ------------------------------------------------------------------------------------------------ one preference
def train_policy(s, a, prompts, version):
    """PPO (s.train_ppo, the reward-hacking watch on unless --no-watch) or RLOO/GRPO (s.train) on the training
    prompts against the fitted fast-tier version. A run the watch paused is judged as it stands (its adapter
    is the policy of the pause) and the table says so."""
    common = dict(wait=True, prompts=prompts, reward_tier="fast", reward_version=version,
                  max_new_tokens=a.max_new_tokens, seed=a.seed, **a.ppo)
    if a.algorithm == "ppo":
        run = s.train_ppo(steps=a.steps, watch=None if a.watch else False, **common)
    else:
        run = s.train(algorithm=a.algorithm, steps=a.steps, **common)
    if run.status not in ("completed", "paused") or run.adapter_id is None:
        raise RuntimeError(f"{a.algorithm} run {run.run_id} ended {run.status}: {run.error or run.notes}")
    return run


def cpu_minutes() -> float:
    """CPU time of this process and of its finished children (the training job is a child process)."""
    t = os.times()
    return (t.user + t.system + t.children_user + t.children_system) / 60


def load() -> float:
    """The machine's 1-minute load average (the machine is shared: wall times depend on it)."""
    return os.getloadavg()[0]


def run_preference(name: str, a, lm) -> dict:
    from rlhf_studio import Studio
    rule = PREFERENCES[name]
    t0, c0 = time.perf_counter(), cpu_minutes()
    with tempfile.TemporaryDirectory() as tmp:
        s = Studio(str(Path(tmp) / "loop.duckdb"), model=lm)
        s.reward.settings.deep_every = 0        # the fast tier only: the deep tier trains on demand
        try:
            train = TRAIN_PROMPTS[:a.prompts]
            labels = label_by_rule(s, rule, train, a)
            if len({stars_of(rule(t)) for t in s.completions()["text"]}) < 2:
                raise SystemExit(f"{name}: the rule gave every training completion the same value; nothing to learn "
                                 "(more prompts or longer answers)")
            version = s.train_reward_model(tier="fast")
            t1 = time.perf_counter()
            run = train_policy(s, a, train, version)
            t2 = time.perf_counter()
            m = run.metrics()
            held = HELDOUT_PROMPTS[:a.heldout]
            wins, cut_wins, lens, pool = [], [], ([], []), []
            for i, p in enumerate(held):
                kw = dict(n=a.judge_n, max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=10_000 + i)
                base = [c.text for c in s.generate(p, **kw)]
                pol = [c.text for c in s.generate(p, adapter=run.adapter_id, **kw)]
                pool.append((p, base))
                for x, y in zip(pol, base):
                    wins.append(judge(rule, x, y))
                    cut_wins.append(judge(rule, *cut_to_same_length(x, y)))
                    lens[0].append(len(x.split()))
                    lens[1].append(len(y.split()))
            return {"preference": name, "labels": labels, "win": mean_interval(wins),
                    "win_same_length": mean_interval(cut_wins), "kl": float(m["kl"].iloc[-1]),
                    "reward_gain": float(m["score_mean"].iloc[-3:].mean() - m["score_mean"].iloc[:3].mean()),
                    "words_policy": sum(lens[0]) / len(lens[0]), "words_base": sum(lens[1]) / len(lens[1]),
                    "rm_heldout_acc": heldout_rm_accuracy(s, rule, pool),
                    "rule_base": sum(rule(t) for _, ts in pool for t in ts) / sum(len(ts) for _, ts in pool),
                    "minutes": (time.perf_counter() - t0) / 60, "cpu_minutes": cpu_minutes() - c0,
                    "status": run.status, "load": load(), "train_minutes": (t2 - t1) / 60,
                    "label_minutes": (t1 - t0) / 60}
        finally:
            s.close()


# ------------------------------------------------------------------------------ suggested vs random label choice
def labels_to_reach(name: str, a, lm, seed: int) -> dict:
    """Pairwise labels (by the rule) each choice needs until the held-out reward-model accuracy reaches a.target."""
    from rlhf_studio import Studio
    rule = PREFERENCES[name]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        with Studio(str(Path(tmp) / "heldout.duckdb"), model=lm) as h:   # a pool nobody may suggest from
            pool = [(p, [c.text for c in h.generate(p, n=a.n, max_new_tokens=a.max_new_tokens,
                                                       temperature=a.temperature, seed=20_000 + i)])
                    for i, p in enumerate(HELDOUT_PROMPTS[:a.heldout])]
        with Studio(str(Path(tmp) / "pool.duckdb"), model=lm) as s:
            s.reward.settings.deep_every = 0
            by_prompt = {}
            for i, p in enumerate(TRAIN_PROMPTS[:a.prompts]):
                cs = s.generate(p, n=a.n, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                seed=seed * 1000 + i)
                by_prompt[cs[0].prompt_id] = cs
            for choice in ("suggest", "random"):        # both choices start from the same unlabelled pool
                s.backup(str(Path(tmp) / f"{choice}.duckdb"))
        for choice in ("suggest", "random"):
            with Studio(str(Path(tmp) / f"{choice}.duckdb"), model=lm) as s:
                s.reward.settings.deep_every = 0
                texts = {c.id: c.text for cs in by_prompt.values() for c in cs}
                rng, out[choice], curve = random.Random(seed), None, []
                for n in range(1, a.max_labels + 1):
                    pair = pick_pair(s, by_prompt, rng, choice)
                    if pair is None:
                        break
                    w = judge(rule, texts[pair[0]], texts[pair[1]])
                    s.compare(pair[0], pair[1], winner={1.0: "a", 0.0: "b", 0.5: "tie"}[w])
                    if n % a.every == 0:
                        acc = heldout_rm_accuracy(s, rule, pool)
                        curve.append((n, round(acc, 3)))       # nan: no reward model yet
                        if acc >= a.target:
                            out[choice] = n
                            break
                out[choice + "_curve"] = curve
    return out


# ------------------------------------------------------------------------------ threads on a shared machine
def thread_probe(lm) -> None:
    """Wall and CPU time of one Studio-style sampling call (6 completions x 24 tokens) at this process's torch
    thread count: on a machine whose cores are oversubscribed, two OpenMP threads wait for each other at every
    barrier, so the count that is faster alone can be far slower there."""
    from rlhf_studio.components.generation import SamplingParams, generate
    generate(lm, "Say hi.", SamplingParams(n=1, max_new_tokens=4, seed=0))       # warm-up
    for _ in range(2):
        w, c = time.perf_counter(), time.process_time()
        generate(lm, "How can I sleep better?", SamplingParams(n=6, max_new_tokens=24, temperature=0.8, seed=1))
        print(f"threads {__import__('torch').get_num_threads()}: wall {time.perf_counter() - w:.1f} s, "
              f"CPU {time.process_time() - c:.1f} s, load {load():.1f}", flush=True)


# --------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefs", nargs="+", default=list(PREFERENCES), choices=list(PREFERENCES))
    ap.add_argument("--quick", action="store_true", help="small and short: 8 prompts, 8 held-out, 6 PPO steps")
    ap.add_argument("--active", action="store_true", help="only the suggested-vs-random comparison")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--prompts", type=int, default=32, help="training prompts")
    ap.add_argument("--heldout", type=int, default=16, help="held-out prompts")
    ap.add_argument("--n", type=int, default=4, help="completions per training prompt")
    ap.add_argument("--stars", type=int, default=4, help="completions starred per prompt")
    ap.add_argument("--pairs", type=int, default=60, help="pairwise labels (suggested pairs)")
    ap.add_argument("--choice", default="suggest", choices=["suggest", "random"])
    ap.add_argument("--judge-n", type=int, default=4, help="samples per held-out prompt and side")
    ap.add_argument("--steps", type=int, default=30, help="PPO steps")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--algorithm", default="ppo", choices=["ppo", "rloo", "grpo"])
    ap.add_argument("--no-watch", dest="watch", action="store_false", help="PPO without the reward-hacking watch")
    ap.add_argument("--ppo", nargs="*", default=[], metavar="KEY=VALUE",
                    help="settings of the algorithm's config beside its defaults, e.g. lr=5e-4 kl_coef=0.05")
    ap.add_argument("--json", help="append each result as one JSON line to this file")
    ap.add_argument("--thread-probe", action="store_true", help="only time one sampling call at this thread count")
    ap.add_argument("--target", type=float, default=0.8, help="held-out reward-model accuracy (--active)")
    ap.add_argument("--max-labels", type=int, default=120)
    ap.add_argument("--every", type=int, default=10, help="labels between held-out accuracy checks (--active)")
    a = ap.parse_args(argv)
    if a.quick:
        a.prompts, a.heldout, a.pairs, a.steps, a.judge_n, a.max_labels = 8, 8, 16, 6, 2, 40
    a.ppo = {k: _number(v) for k, v in (kv.split("=", 1) for kv in a.ppo)}
    return a


def _number(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def main(argv=None) -> None:
    a = parse_args(argv)
    from rlhf_studio.components.models import load_model
    lm = load_model("embedded")
    print(f"threads {__import__('torch').get_num_threads()}; settings {vars(a)}", flush=True)
    if a.thread_probe:
        return thread_probe(lm)
    for name in a.prefs:
        for seed in a.seeds:
            a.seed = seed
            if a.active:
                print(f"{name} seed {seed}: labels to reach {a.target:.0%}: {labels_to_reach(name, a, lm, seed)}",
                      flush=True)
                continue
            r = run_preference(name, a, lm)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps({**r, "seed": seed, "settings": {k: v for k, v in vars(a).items()}},
                                       default=str) + "\n")
            w, c = r["win"], r["win_same_length"]
            print(f"{name} seed {seed}: {r['labels']} labels, win {w[0]:.2f} [{w[1]:.2f}, {w[2]:.2f}], same length "
                  f"{c[0]:.2f} [{c[1]:.2f}, {c[2]:.2f}], KL {r['kl']:.1f}, words {r['words_policy']:.0f} vs "
                  f"{r['words_base']:.0f}, RM held-out acc {r['rm_heldout_acc']:.2f}, base rule mean "
                  f"{r['rule_base']:.2f}, score gain {r['reward_gain']:.2f}, {r['minutes']:.1f} min ({r['cpu_minutes']:.1f} "
                  f"CPU min, load {r['load']:.1f}; labels+fit {r['label_minutes']:.1f}, training "
                  f"{r['train_minutes']:.1f} min), run {r['status']}", flush=True)


if __name__ == "__main__":
    main()
