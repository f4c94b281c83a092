"""The fast sampler with and without the deduplicated prefill, on an RLOO/GRPO-shaped batch, in one process.

RLOO and GRPO sample k completions of each prompt: a batch is `prompts` distinct prompts each repeated k times.
`fastgen.DEDUPE_PREFILL` (default on) runs each distinct prompt's prefill once and copies its KV slots to its
repeats. This times `rollout.sample()` as the online trainer calls it (the real SmolLM2-135M-Instruct in fp32,
chat-templated prompts, a LoRA r=16 policy adapter with random B, hidden states captured), and the prefill alone
(`fast_generate` with one new token), alternating dedupe on and off rep by rep with the same random numbers, so
that both produce the same tokens and the machine's load hits both alike. Wall and CPU (process) time.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_prefill.py [--prompts 2] [--k 4] [--new-tokens 24] [--reps 7]
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


def timed(fn, dedupe: bool, seed: int):
    fastgen.DEDUPE_PREFILL = dedupe
    torch.manual_seed(seed)
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    cases = {
        "sample": lambda: sample(lm.model, q, qm, args.new_tokens, 0.7, 1.0, eos, pad, capture_hidden=True),
        "prefill": lambda: fastgen.fast_generate(lm.model, q, qm, 1, temperature=0.7, eos_token_id=eos,
                                                 pad_token_id=pad),
    }
    res = {"batch": list(q.shape), "prompts": args.prompts, "k": args.k, "new_tokens": args.new_tokens,
           "reps": args.reps, "threads": torch.get_num_threads()}
    differ = []    # reps whose tokens or hidden states differ with and without dedupe
    for case, fn in cases.items():
        times = {True: [], False: []}
        for dedupe in (True, False):    # warm-up (buffers, first-call costs)
            timed(fn, dedupe, 0)
        for rep in range(args.reps):
            outs = {}
            for dedupe in ((True, False) if rep % 2 == 0 else (False, True)):
                wall, cpu, outs[dedupe] = timed(fn, dedupe, rep)
                times[dedupe].append((wall, cpu))
            a, b = outs[True], outs[False]
            if case == "sample" and not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])):
                differ.append(rep)
        row = {}
        for dedupe, label in ((False, "full"), (True, "dedupe")):
            row[label] = {"wall_s": round(statistics.median(t[0] for t in times[dedupe]), 4),
                          "cpu_s": round(statistics.median(t[1] for t in times[dedupe]), 4)}
        row["ratio_wall"] = round(row["full"]["wall_s"] / row["dedupe"]["wall_s"], 2)
        row["ratio_cpu"] = round(row["full"]["cpu_s"] / row["dedupe"]["cpu_s"], 2)
        res[case] = row
    res["reps_that_differ"] = differ
    fastgen.DEDUPE_PREFILL = True

    print(f"CPU, 1 thread, fp32; {args.prompts} prompts x {args.k} rows = batch {tuple(q.shape)}, "
          f"{args.new_tokens} new tokens, LoRA r=16 active; medians of {args.reps} alternating reps\n")
    print("| timed | full prefill wall / CPU s | dedupe wall / CPU s | full / dedupe wall | CPU |")
    print("|---|---|---|---|---|")
    for case in cases:
        r = res[case]
        print(f"| {case} | {r['full']['wall_s']:.3f} / {r['full']['cpu_s']:.3f} | {r['dedupe']['wall_s']:.3f} / "
              f"{r['dedupe']['cpu_s']:.3f} | {r['ratio_wall']:.2f}x | {r['ratio_cpu']:.2f}x |")
    print(f"\nreps whose tokens or captured hidden states differ with and without dedupe: {differ or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
