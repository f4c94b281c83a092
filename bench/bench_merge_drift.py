"""How far sampling with the LoRA merged into bf16 weights is from the unmerged policy (real weights, CPU).

PPO on CUDA samples with the adapter merged into the bf16 base (components/fastgen.py: ~1.8x the unmerged
decode there), then computes the old log-probs with the unmerged policy. Merging rounds W + BA to bf16, so the
sampling distribution is not exactly the policy's. This measures that gap on the embedded SmolLM2-135M-Instruct
with a LoRA whose effect on the outputs is the size of a trained policy's, and puts it beside two scales:
    policy vs base       KL(policy || base): how far the adapter moves the model (what PPO's KL penalty sees)
    bf16 vs fp32         KL(fp32 policy || bf16 policy): the cost of running the model in bf16 at all
    merged vs unmerged   KL(bf16 unmerged || bf16 merged): what merging adds
Per-token KL in nats over teacher-forced sampled responses (the positions PPO trains on), plus greedy agreement.

Measured (2026-11-26, lora-std 0.004): policy vs base 2.7e-3, bf16 vs fp32 1.2e-3, merged vs unmerged 2.0e-3.
Any change of rounding order in a bf16 network lands near that bf16 floor: a tried alternative to merging that
kept the LoRA term separate but in bf16 (two kernels a layer instead of peft's six fp32 ones) gave 1.75e-3: no
closer to the unmerged policy than merging, while it still runs three kernels a layer where merging runs one
(its speed was not timed), so it was dropped.

    python bench/bench_merge_drift.py [--prompts 16 --tokens 48 --lora-std 0.004]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_ppo import PROMPTS  # noqa: E402
from components.fastgen import rollout_weights  # noqa: E402
from components.models import load_model  # noqa: E402
from components.ppo.config import PPOConfig  # noqa: E402
from components.ppo.rollout import encode_prompts, left_pad, mask_after_eos, position_ids_from_mask, sample  # noqa: E402
from components.ppo.trainer import attach_policy_adapter  # noqa: E402


def response_logprobs(model, q, qm, resp, rmask) -> torch.Tensor:
    """log-softmax over the vocabulary at each response position [B, R, V], float32."""
    ids = torch.cat([q, resp], 1)
    am = torch.cat([qm, rmask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits
    P, R = q.shape[1], resp.shape[1]
    return torch.log_softmax(logits[:, P - 1:P - 1 + R].float(), -1)


def kl(p_log: torch.Tensor, q_log: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over real positions of KL(p || q) in nats."""
    k = (p_log.exp() * (p_log - q_log)).sum(-1)
    return float((k * mask).sum() / mask.sum())


def greedy_agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    same_row = (a == b).all(1)
    return {"rows_identical": int(same_row.sum()), "rows": a.shape[0],
            "token_agreement": round(float((a == b).float().mean()), 4)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--lora-std", type=float, default=0.004,
                    help="std of the LoRA B entries (A keeps peft's init); sets how far the policy is from the base")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    prompts = (PROMPTS * ((args.prompts + len(PROMPTS) - 1) // len(PROMPTS)))[:args.prompts]
    cfg = PPOConfig()

    models = {}
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        lm = load_model(device="cpu", dtype=dtype)
        torch.manual_seed(args.seed)            # the same LoRA A init in both copies
        pm = attach_policy_adapter(lm, cfg)
        g = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_((torch.randn(p.shape, generator=g) * args.lora_std).to(p.dtype))
        models[name] = (lm, pm.eval())

    lm16, pm16 = models["bf16"]
    q, qm = left_pad(encode_prompts(lm16, prompts, cfg.max_prompt_tokens), lm16.pad_token_id, "cpu")
    torch.manual_seed(args.seed + 2)
    resp = sample(pm16, q, qm, args.tokens, cfg.temperature, 1.0, lm16.eos_token_id, lm16.pad_token_id)
    rmask, _ = mask_after_eos(resp, lm16.eos_token_id)
    resp = torch.where(rmask.bool(), resp, torch.full_like(resp, lm16.pad_token_id))
    m = rmask.float()

    lp32 = response_logprobs(models["fp32"][1], q, qm, resp, rmask)
    lp16 = response_logprobs(pm16, q, qm, resp, rmask)
    with rollout_weights(pm16, merge=True) as merged:
        assert merged, "the adapter was not merged"
        lp16m = response_logprobs(pm16, q, qm, resp, rmask)
    with pm16.disable_adapter():
        lp16base = response_logprobs(pm16, q, qm, resp, rmask)

    def greedy(merge: bool):
        with rollout_weights(pm16, merge=merge):
            return sample(pm16, q, qm, 32, 1.0, 1.0, lm16.eos_token_id, lm16.pad_token_id, greedy=True)

    res = {
        "model": lm16.model_id, "positions": int(m.sum()), "lora_std": args.lora_std,
        "kl_policy_vs_base": kl(lp16, lp16base, m),
        "kl_fp32_vs_bf16": kl(lp32, lp16, m),
        "kl_unmerged_vs_merged_bf16": kl(lp16, lp16m, m),
        "max_abs_logp_diff_merged": float(((lp16.gather(-1, resp.unsqueeze(-1)) -
                                            lp16m.gather(-1, resp.unsqueeze(-1))).squeeze(-1).abs() * m).max()),
        "greedy_merged_vs_unmerged_bf16": greedy_agreement(greedy(True), greedy(False)),
    }
    print(f"per-token KL (nats) over {res['positions']} sampled response positions, SmolLM2-135M, LoRA r=16:")
    print(f"  policy vs base (the adapter's own effect) {res['kl_policy_vs_base']:.2e}")
    print(f"  fp32 vs bf16 policy                       {res['kl_fp32_vs_bf16']:.2e}")
    print(f"  bf16 unmerged vs merged                   {res['kl_unmerged_vs_merged_bf16']:.2e}"
          f"   ratio to fp32-vs-bf16: {res['kl_unmerged_vs_merged_bf16'] / max(res['kl_fp32_vs_bf16'], 1e-30):.2f}")
    print(f"  greedy (32 tokens) merged vs unmerged bf16: {res['greedy_merged_vs_unmerged_bf16']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
