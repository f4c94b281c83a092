"""The training passes' layout against the masked one, forward + backward, on the embedded model.

forward_response lays the training batch out from column 0 and runs attention unmasked and causal
(components/ppo/rollout.py, `_aligned_left`); the masked, left-padded layout is what it ran before and what
passes that need the batch's own hidden states still run. Same rows, same adapter, both in this process.

    python bench/bench_training_layout.py [--rows 16] [--new-tokens 64] [--reps 3]
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
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    from components.models import load_model
    from components.ppo import PPOConfig
    from components.ppo.rollout import forward_response, left_pad
    from components.ppo.trainer import attach_policy_adapter
    torch.manual_seed(0)
    lm = load_model("embedded", dtype="fp32")
    attach_policy_adapter(lm, PPOConfig(lora_r=16, lora_alpha=32))
    vocab = lm.model.config.vocab_size
    lengths = torch.randint(16, 65, (args.rows,)).tolist()         # prompts of 16..64 tokens, as the GPU bench
    q, qm = left_pad([torch.randint(3, vocab, (n,)).tolist() for n in lengths], lm.pad_token_id)
    r = torch.randint(3, vocab, (args.rows, args.new_tokens))
    rm = torch.ones_like(r)

    def one(masked: bool) -> float:
        t0 = time.perf_counter()
        fo = forward_response(lm.model, q, qm, r, rm, 1.0, want_hidden=masked, share_prefix=False)
        fo.logp.sum().backward()
        return time.perf_counter() - t0

    one(True), one(False)                                            # warm-up
    times = {True: [], False: []}
    for _ in range(args.reps):                                       # interleaved, so drift hits both alike
        for masked in (True, False):
            times[masked].append(one(masked))
    masked, aligned = statistics.median(times[True]), statistics.median(times[False])
    print(f"{args.rows} rows x (16..64 prompt + {args.new_tokens} response tokens), SmolLM2-135M fp32, "
          f"{torch.get_num_threads()} threads, forward + backward, medians of {args.reps}")
    print(f"masked, left-padded: {masked:.2f} s   from column 0, unmasked: {aligned:.2f} s   "
          f"ratio {masked / aligned:.2f}x")


if __name__ == "__main__":
    main()
