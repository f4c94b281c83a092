"""The fast sampler's two CPU shortcuts, each on and off, on an RLOO/GRPO-shaped batch, in one process.

RLOO and GRPO sample k completions of each prompt: a batch is `prompts` distinct prompts each repeated k times.
`--switch dedupe`: `fastgen.DEDUPE_PREFILL` (default on) runs each distinct prompt's prefill once and copies its
KV slots to its repeats; timed are `rollout.sample()` as the online trainer calls it (the real
SmolLM2-135M-Instruct in fp32, chat-templated prompts, a LoRA r=16 policy adapter with random B, hidden states
captured, temperature 0.7) and the prefill alone (`fast_generate` with one new token).
`--switch pack`: `fastgen.PACK_DECODE` (default on) runs the decode steps through oneDNN's packed weights
(components/cpu_linear.py), packing included; timed is `sample()` greedy, so that both sides decode the same tokens
(rounding could still part them: the run reports reps that differ).
On and off alternate rep by rep with the same random numbers, so that the machine's load hits both alike. Wall
and CPU (process) time.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_sampler.py [--switch dedupe|pack] [--prompts 2] [--k 4]
        [--new-tokens 24] [--reps 7]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_ppo import PROMPTS  # noqa: E402
from rlhf_studio.components import fastgen  # noqa: E402
from rlhf_studio.components.models import load_model  # noqa: E402
from rlhf_studio.components.training.ppo_config import PPOConfig  # noqa: E402
from rlhf_studio.components.training.engine.adapter import attach_policy_adapter  # noqa: E402
from rlhf_studio.components.training.engine.rollout import encode_prompts, left_pad, sample  # noqa: E402


SWITCHES = {"dedupe": "DEDUPE_PREFILL", "pack": "PACK_DECODE"}


def timed(fn, switch: str, on: bool, seed: int):
    setattr(fastgen, SWITCHES[switch], on)
    torch.manual_seed(seed)
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--switch", choices=sorted(SWITCHES), default="dedupe")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--k", type=int, default=4, help="completions per prompt (rows repeating each prompt)")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)

    lm = load_model("embedded", device="cpu", dtype="fp32")
    attach_policy_adapter(lm, PPOConfig(lora_r=16, lora_alpha=32))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    seqs = encode_prompts(lm, PROMPTS[:args.prompts], 256)
    q, qm = left_pad([s for s in seqs for _ in range(args.k)], lm.pad_token_id, lm.device)
    eos, pad = lm.eos_token_id, lm.pad_token_id
    if args.switch == "dedupe":
        cases = {
            "sample": lambda: sample(lm.model, q, qm, args.new_tokens, 0.7, 1.0, eos, pad, capture_hidden=True),
            "prefill": lambda: fastgen.fast_generate(lm.model, q, qm, 1, temperature=0.7, eos_token_id=eos,
                                                     pad_token_id=pad),
        }
    else:
        cases = {"sample": lambda: sample(lm.model, q, qm, args.new_tokens, 0.7, 1.0, eos, pad, greedy=True,
                                          capture_hidden=True)}
    res = {"switch": args.switch, "batch": list(q.shape), "prompts": args.prompts, "k": args.k,
           "new_tokens": args.new_tokens, "reps": args.reps, "threads": torch.get_num_threads()}
    differ = []    # reps whose tokens or hidden states differ with the shortcut on and off
    for case, fn in cases.items():
        times = {True: [], False: []}
        for on in (True, False):    # warm-up (buffers, first-call costs)
            timed(fn, args.switch, on, 0)
        for rep in range(args.reps):
            outs = {}
            for on in ((True, False) if rep % 2 == 0 else (False, True)):
                wall, cpu, outs[on] = timed(fn, args.switch, on, rep)
                times[on].append((wall, cpu))
            a, b = outs[True], outs[False]
            if case == "sample" and not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])):
                differ.append(rep)
        row = {}
        for on, label in ((False, "off"), (True, "on")):
            row[label] = {"wall_s": round(statistics.median(t[0] for t in times[on]), 4),
                          "cpu_s": round(statistics.median(t[1] for t in times[on]), 4)}
        row["ratio_wall"] = round(row["off"]["wall_s"] / row["on"]["wall_s"], 2)
        row["ratio_cpu"] = round(row["off"]["cpu_s"] / row["on"]["cpu_s"], 2)
        res[case] = row
    res["reps_that_differ"] = differ
    setattr(fastgen, SWITCHES[args.switch], True)

    print(f"CPU, 1 thread, fp32; {args.prompts} prompts x {args.k} rows = batch {tuple(q.shape)}, "
          f"{args.new_tokens} new tokens, LoRA r=16 active; {args.switch} on and off, medians of {args.reps} "
          f"alternating reps\n")
    print(f"| timed | {args.switch} off: wall / CPU s | {args.switch} on: wall / CPU s | off / on wall | CPU |")
    print("|---|---|---|---|---|")
    for case in cases:
        r = res[case]
        print(f"| {case} | {r['off']['wall_s']:.3f} / {r['off']['cpu_s']:.3f} | {r['on']['wall_s']:.3f} / "
              f"{r['on']['cpu_s']:.3f} | {r['ratio_wall']:.2f}x | {r['ratio_cpu']:.2f}x |")
    exact = "with exact hidden states expected" if args.switch == "dedupe" else "(rounding may part them)"
    print(f"\nreps whose tokens or captured hidden states differ with {args.switch} on and off {exact}: "
          f"{differ or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
