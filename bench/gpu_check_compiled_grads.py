"""Do the compiled training passes give the eager passes' gradients on this GPU, adapter by adapter?

An H100 profile of the compiled training phase (docs/GPU.md, run 8) showed no attention backward kernel while
layers ran with the left-padding mask: the q/k/v adapters got no gradient and nothing failed. The training
passes now lay rows out from column 0 and run attention unmasked (components/ppo/rollout.py). This compares,
for one micro-batch of sampled rows, every trainable tensor's gradient from torch.compile'd layers (inductor)
with the eager one, in three layouts: packed rows (the training layout where packing applies), rows from column 0,
and the masked one (want_hidden=True); and the packed rows' gradients with the padded ones'.

    python bench/gpu_check_compiled_grads.py --shape 1.7b      # on a GPU, ~2 minutes (three compilations)
    python bench/gpu_check_compiled_grads.py --device cpu --shape tiny
"""
from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.gpu_ppo import random_trainer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="1.7b")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--lora-precision", choices=["auto", "fp32", "half"], default="auto")
    ap.add_argument("--cpu-dtype", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args(argv)
    from components.ppo.rollout import forward_response, rollout
    from components.ppo.trainer import causal_lm_of, swapped_layers
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" or args.cpu_dtype == "bf16" else torch.float32
    trainer, prompts = random_trainer(args.shape, device, dtype, args.rows, batch_size=args.rows,
                                      mini_batch_size=args.rows, max_new_tokens=args.new_tokens,
                                      max_prompt_tokens=64, seed=0, value_head_init="zeros", compile="on",
                                      missing_eos_penalty=0.0, lora_precision=args.lora_precision)
    lm = trainer.lm
    g = torch.Generator().manual_seed(0)
    for name, p in lm.model.named_parameters():      # non-zero B, so every A gets a gradient too
        if "lora_B" in name:
            p.data.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))
    with torch.no_grad():
        trainer.value_head.weight.normal_(0, 0.02)
    ro = rollout(trainer.model, lm, prompts, max_prompt_tokens=64, max_new_tokens=args.new_tokens,
                 temperature=1.0, score_tokens=False, device=device)
    rm = ro.response_mask.float()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decoder = causal_lm_of(trainer.model).get_decoder()

    layouts = {"training, packed rows (no padding)": dict(want_hidden=False, pack=True),
               "training, from column 0, unmasked": dict(want_hidden=False, pack=False),
               "masked, left-padded": dict(want_hidden=True, pack=False)}

    def gradients(compiled: bool, layout: str) -> tuple[dict, torch.Tensor]:
        for p in trainer._params:
            p.grad = None
        layers = swapped_layers(decoder, trainer._compiled_layers) if compiled else nullcontext()
        with trainer._fused(), layers:     # as the update runs them
            fo = forward_response(trainer.model, ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask,
                                  1.0, value_head=trainer.value_head, share_prefix=False, **layouts[layout],
                                  logprobs_fn=trainer._logprobs_fn if compiled else None)
            ((fo.logp * rm).sum() / rm.sum() + (fo.values * rm).sum() / rm.sum()).backward()
        return ({names.get(id(p), "value_head"): None if p.grad is None else p.grad.detach().float().clone()
                 for p in trainer._params}, fo.logp.detach().float())

    def errors(got: dict, want: dict) -> list[float]:
        return [float(torch.linalg.vector_norm(got[n] - want[n]) / torch.linalg.vector_norm(want[n]).clamp_min(1e-30))
                for n in want if want[n] is not None and got[n] is not None]

    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}: {args.shape}, {args.rows} rows, "
          f"{len(trainer._params)} trainable tensors, LoRA matmuls in {'bf16' if trainer.half_lora else 'fp32'}")
    print("| layout | tensors without gradient (compiled / eager) | q_proj tensors without | median rel. error "
          "| max rel. error |")
    print("|---|---|---|---|---|")
    eager_of = {}
    for layout in layouts:
        eager, comp = gradients(False, layout), gradients(True, layout)
        eager_of[layout] = eager
        none_c = [n for n, v in comp[0].items() if v is None]
        none_e = [n for n, v in eager[0].items() if v is None]
        errs = errors(comp[0], eager[0])
        q_none = sum("q_proj" in n for n in none_c)
        print(f"| {layout} | {len(none_c)} / {len(none_e)} | {q_none} | "
              f"{statistics.median(errs):.4f} | {max(errs):.4f} |" if errs else f"| {layout} | all missing |")
    # packing against padding, both eager: the same rows, so the same numbers up to rounding
    # the same rows through two other layouts that should agree (column 0 against masked) give the scale of
    # rounding against which the packed-against-padded figures read
    keep = rm.bool()
    from components.attention import _VARLEN_WORKS
    for (first, second), what in ((list(layouts)[:2], "packed against padded rows"),
                                  (list(layouts)[1:], "column 0 against masked (the rounding's scale)")):
        (g1, lp1), (g2, lp2) = eager_of[first], eager_of[second]
        errs, lp_diff = errors(g1, g2), (lp1 - lp2)[keep].abs()
        print(f"{what}, eager: gradients median rel. error {statistics.median(errs):.4f}, max {max(errs):.4f}; "
              f"log-probs abs difference median {float(lp_diff.median()):.4f}, max {float(lp_diff.max()):.4f}")
    print(f"varlen_attn probe by device: {_VARLEN_WORKS or 'not used'}")


if __name__ == "__main__":
    main()
