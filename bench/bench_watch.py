"""Does the reward-hacking watch pause gamed runs early and leave honest runs alone? Over several seeds.

For each seed, two PPO runs of the same length with the watch checking every `--every` steps (tests/watch_sim.py
has the simulated annotator): "gamed" (a reward that pays for a spurious cue, the token whose count went most
with the true preference on the labelled samples) and "honest" (the annotator's rule itself). The runs go on
after a pause verdict so that the true preference's course is seen. Printed per seed: the true preference's
peak (step), the step of the first pause, steps after the peak, how far the true preference had fallen at the
pause and by the end, the flags that fired; and for the honest run whether it paused (a false pause).

    .venv/bin/python bench/bench_watch.py --seeds 0 1 2 --steps 12 --every 2 --layers 4
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers kept (30 = the whole embedded model)")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(int(os.environ.get("RLHF_STUDIO_TRAIN_THREADS") or 1))
    from rlhf_studio.components.models import load_model
    from rlhf_studio.components.training.watch import WatchConfig
    from tests.layers import keep_first_layers
    from tests.watch_sim import simulate

    lm = load_model("embedded", dtype="fp32")
    if args.layers < lm.model.config.num_hidden_layers:
        keep_first_layers(lm, args.layers)
    cfg = WatchConfig(every=args.every)
    print(f"watch {cfg.to_dict()}\nPPO: {args.steps} steps, {args.layers} layers, {args.max_new_tokens} new tokens")
    print("seed | cue | truth peak (step) | paused at | steps after peak | truth fall at pause / at end | "
          "flags at pause | honest: false pause? | s")
    late, false_pauses, missed = [], 0, 0
    for seed in args.seeds:
        t0 = time.time()
        g = simulate(lm, "gamed", args.steps, cfg, seed=seed, max_new_tokens=args.max_new_tokens)
        h = simulate(lm, "honest", args.steps, cfg, seed=seed, max_new_tokens=args.max_new_tokens)
        peak = max(range(len(g["truth"])), key=g["truth"].__getitem__)
        if g["paused_at"] is None:
            missed += 1
            at_txt, after, fall_at, flags = "never", "-", float("nan"), "-"
        else:
            at = g["steps"].index(g["paused_at"])
            after = g["paused_at"] - g["steps"][peak]
            late.append(after)
            at_txt, fall_at, flags = str(g["paused_at"]), g["truth"][peak] - g["truth"][at], "; ".join(g["flags"][at])
        false_pauses += h["paused_at"] is not None
        honest = f"yes at step {h['paused_at']} ({'; '.join(h['flags'][h['steps'].index(h['paused_at'])])})" \
            if h["paused_at"] is not None else "no"
        print(f"{seed} | {g['cue']!r} | {g['truth'][peak]:.2f} ({g['steps'][peak]}) | {at_txt} | {after} | "
              f"{fall_at:.2f} / {g['truth'][peak] - g['truth'][-1]:.2f} | {flags} | {honest} | {time.time() - t0:.0f}")
        print(f"    gamed truth {[round(x, 2) for x in g['truth']]} reward {[round(x, 2) for x in g['reward']]}")
        print(f"    honest truth {[round(x, 2) for x in h['truth']]} reward {[round(x, 2) for x in h['reward']]}")
    n = len(args.seeds)
    print(f"gamed runs paused: {n - missed}/{n}; steps after the true preference's peak: {late}; "
          f"false pauses on honest runs: {false_pauses}/{n}")


if __name__ == "__main__":
    main()
