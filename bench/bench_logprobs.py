"""Log-probs from the head's logits, forward + backward: eager `logprobs_from_logits` against its torch.compile'd
version (what the compiled PPO update runs), on bf16 logits of the embedded model's vocabulary, in one process.

Eager casts the [rows, R, V] logits to fp32 and logsumexp passes over that copy several times, forward and
backward; inductor fuses the cast and the reduction into one pass over the bf16 logits.

    python bench/bench_logprobs.py [--rows 16] [--new-tokens 64] [--vocab 49152] [--reps 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    from components.ppo.core import logprobs_from_logits
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(args.rows, args.new_tokens, args.vocab, generator=g) * 3).to(dev, torch.bfloat16)
    labels = torch.randint(0, args.vocab, (args.rows, args.new_tokens), generator=g).to(dev)
    variants = {"eager": logprobs_from_logits,
                "compiled": torch.compile(logprobs_from_logits, dynamic=True)}

    def one(fn) -> float:
        x = logits.detach().requires_grad_()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(x, labels, 0.7).sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for fn in variants.values():                                     # warm-up (and compile)
        one(fn)
    times = {name: [] for name in variants}
    for _ in range(args.reps):                                       # interleaved, so drift hits both alike
        for name, fn in variants.items():
            times[name].append(one(fn))
    eager, compiled = (statistics.median(t) for t in times.values())
    print(f"logits {args.rows} x {args.new_tokens} x {args.vocab} bf16 on {args.device}, forward + backward, "
          f"medians of {args.reps}")
    print(f"eager: {eager * 1e3:.1f} ms   compiled: {compiled * 1e3:.1f} ms   ratio {eager / compiled:.2f}x")


if __name__ == "__main__":
    main()
