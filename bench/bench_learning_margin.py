"""Margins of tests/test_ppo_learning.py's learning test over seeds: the held-out reward-model score after PPO on
the real reward against a control run with the scores shuffled across each batch (same settings, EOS penalty
on). Prints one line per seed and run; nothing is asserted here.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/bench_learning_margin.py --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--controls", nargs="+", default=["shuffled"])
    a = ap.parse_args()
    from rlhf_studio.components.models import load_model
    from tests import test_ppo_learning as t
    lm = load_model("embedded", dtype="fp32")
    print("threads", torch.get_num_threads(), flush=True)
    for seed in a.seeds:
        t0 = time.perf_counter()
        reward, X, L = t.fit_length_reward(lm, t.TRAIN_PROMPTS, seed=seed)
        spread = float(((X - reward.mean) / reward.std @ reward.weight).std())
        print(f"seed {seed}: reward fit {time.perf_counter() - t0:.0f}s spread {spread:.3f}", flush=True)
        base = None
        for mode in ["real"] + a.controls:
            t0 = time.perf_counter()
            fn = reward if mode == "real" else t.ControlReward(reward, mode, seed)
            after, hist, b = t.learning_run(lm, fn, reward, a.steps, seed=seed, base_too=base is None)
            base = base or b
            print(f"seed {seed} {mode}: held-out score {after[0]:.2f} (base {base[0]:.2f}), gain over base "
                  f"{(after[0] - base[0]) / spread:.2f} score sd, length {after[1]:.1f} (base {base[1]:.1f}), eos "
                  f"{after[2]:.2f}, kl max {max(m['kl'] for m in hist):.1f}; {time.perf_counter() - t0:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
