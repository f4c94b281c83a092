"""The fast rollout sampler against `model.generate` on the real embedded model, in one process, on the CPU or CUDA.

Issue 7 asks that on the CPU the fast path is not slower than `generate` and that greedy outputs match. This
times PPO-shaped rollouts (the real SmolLM2-135M-Instruct, chat-templated prompts, left padding, a LoRA r=16
policy adapter with random B so that it changes the outputs, temperature 0.7), alternating the two samplers
rep by rep so machine load hits both alike, and checks greedy equality on the same batch.

    .venv/bin/python bench/bench_fastgen.py [--device cpu|cuda] [--batch 8] [--new-tokens 32] [--reps 5]
                                            [--dtype fp32]
bench/gpu_fast.py times the same two samplers at larger, random-weight shapes on a GPU (with CUDA graphs).
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
from rlhf_studio.components.fastgen import fast_generate, plain_generate  # noqa: E402
from rlhf_studio.components.models import load_model  # noqa: E402
from rlhf_studio.components.training.ppo_config import PPOConfig  # noqa: E402
from rlhf_studio.components.training.engine.rollout import encode_prompts, left_pad  # noqa: E402
from rlhf_studio.components.training.engine.adapter import attach_policy_adapter  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", default=None, help="default: fp32 on the CPU, bf16 on CUDA")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    lm = load_model("embedded", device=args.device, dtype=args.dtype)
    attach_policy_adapter(lm, PPOConfig(lora_r=16, lora_alpha=32))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))
    q, qm = left_pad(encode_prompts(lm, PROMPTS[:args.batch], 256), lm.pad_token_id, lm.device)
    kw = dict(eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id)

    # greedy equality (the adapter active, unmerged in `generate`, merged by the fast path)
    a = plain_generate(lm.model, q, qm, args.new_tokens, temperature=0.0, **kw)
    b = fast_generate(lm.model, q, qm, args.new_tokens, temperature=0.0, **kw)
    greedy_equal = a.sequences.shape == b.sequences.shape and bool((a.sequences == b.sequences).all())

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, int(out.response_mask.sum())

    runs = {"generate": [], "fast": []}
    tokens = {"generate": [], "fast": []}
    samplers = {"generate": lambda: plain_generate(lm.model, q, qm, args.new_tokens, temperature=0.7, **kw),
                "fast": lambda: fast_generate(lm.model, q, qm, args.new_tokens, temperature=0.7, **kw)}
    for fn in samplers.values():   # warm-up
        fn()
    for _ in range(args.reps):
        for name, fn in samplers.items():
            s, n = timed(fn)
            runs[name].append(s)
            tokens[name].append(n)
    res = {"device": args.device, "batch": args.batch, "new_tokens": args.new_tokens, "dtype": args.dtype, "reps": args.reps,
           "threads": torch.get_num_threads(), "greedy_equal": greedy_equal}
    for name in runs:
        med = statistics.median(runs[name])
        res[name] = {"median_s": round(med, 3), "all_s": [round(x, 2) for x in runs[name]],
                     "tokens_per_s": round(statistics.median(t / s for t, s in zip(tokens[name], runs[name])), 1)}
    res["speedup_tokens_per_s"] = round(res["fast"]["tokens_per_s"] / res["generate"]["tokens_per_s"], 2)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}, {args.dtype}; batch {args.batch} x {args.new_tokens} sampled "
          f"tokens, LoRA r=16 active; medians of {args.reps} alternating reps\n")
    print("| sampler | s per rollout | tokens/s |\n|---|---|---|")
    for name in runs:
        print(f"| {name} | {res[name]['median_s']:.2f} | {res[name]['tokens_per_s']:.1f} |")
    print(f"\nfast / generate tokens/s: {res['speedup_tokens_per_s']:.2f}x; greedy outputs equal: {greedy_equal}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
