"""Two ways of running a training pass, forward + backward, on the embedded model, in one process.

--compare layout: forward_response lays the training batch out from column 0 and runs attention unmasked and
causal (components/ppo/rollout.py, `_aligned_left`); the masked, left-padded layout is what it ran before and
what passes that need the batch's own hidden states still run (peft's LoRA forward, as the passes ran then).
--compare siblings: the fused LoRA forward (components/fused_lora.py) with one x A^T matmul for the layers that
read one input (q/k/v, gate/up) against one matmul per layer; training layout.
--compare packing: the rows packed into one sequence without padding (`forward_response(pack=True)`) against the
rows from column 0, padded to the longest prompt; fused LoRA forward.

    python bench/bench_training_layout.py [--compare layout|siblings|packing] [--rows 16] [--new-tokens 64]
                                          [--reps 3]
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
    ap.add_argument("--compare", choices=["layout", "siblings", "packing"], default="layout")
    args = ap.parse_args(argv)
    from contextlib import nullcontext

    from components.fused_lora import fused_lora
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

    # variant name -> (masked layout?, packed rows?, LoRA forward context); the first is the baseline
    variants = {"layout": {"masked, left-padded": (True, False, nullcontext),
                           "from column 0, unmasked": (False, False, nullcontext)},
                "siblings": {"one A matmul a layer": (False, False, lambda: fused_lora(lm.model, siblings=False)),
                             "one for q/k/v and gate/up": (False, False, lambda: fused_lora(lm.model, siblings=True))},
                "packing": {"rows from column 0, padded": (False, False, lambda: fused_lora(lm.model)),
                            "rows packed, no padding": (False, True, lambda: fused_lora(lm.model))},
                }[args.compare]
    def one(name: str) -> float:
        masked, pack, lora = variants[name]
        t0 = time.perf_counter()
        with lora():
            fo = forward_response(lm.model, q, qm, r, rm, 1.0, want_hidden=masked, share_prefix=False, pack=pack)
            fo.logp.sum().backward()
        return time.perf_counter() - t0

    for name in variants:                                            # warm-up
        one(name)
    times = {name: [] for name in variants}
    for _ in range(args.reps):                                       # interleaved, so drift hits both alike
        for name in variants:
            times[name].append(one(name))
    (base, t_base), (new, t_new) = ((name, statistics.median(t)) for name, t in times.items())
    print(f"{args.rows} rows x (16..64 prompt + {args.new_tokens} response tokens), SmolLM2-135M fp32, "
          f"{torch.get_num_threads()} threads, forward + backward, medians of {args.reps}")
    print(f"{base}: {t_base:.2f} s   {new}: {t_new:.2f} s   ratio {t_base / t_new:.2f}x")


if __name__ == "__main__":
    main()
