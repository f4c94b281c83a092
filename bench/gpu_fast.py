"""GPU benchmark of the fast rollout path (components.fastgen) and of a LoRA training step. Prints a table; not a test.

Everything runs in ONE process on one GPU, so the ratios compare like with like. Models are built from configs
with random weights (no network): SmolLM2-135M shape and SmolLM2-1.7B shape, bf16, LoRA r=16 on all linear layers
(lora_B random, so the adapter really changes the outputs).

Generation (batch 64, 64-token prompts, 128 sampled tokens, temperature 1, top-p 1, LoRA active):
  * baseline: `model.generate` (peft model, unmerged LoRA, dynamic cache)
  * fast: `fast_generate` (LoRA merged for the rollout, static KV cache, CUDA-graph decode step); its first call,
    which captures the graph, is timed apart; also the same path without the graph (eager).
  * greedy equality on the GPU: fp32 135M shape, LoRA active, 32 tokens, fast (merged) vs `generate` (unmerged)
    must be identical; in bf16 the agreement is reported (random weights give flat logits, and merging in bf16
    rounds the weights, so a few argmax flips are expected there).
Training step (16 x 256 tokens, LoRA r=16 all-linear, forward + backward + AdamW):
  * baseline: plain HF forward with full logits (fp32 cross-entropy over all positions), micro-batch 16
  * optimised: bf16 autocast, the trunk's hidden states then log-probs in chunks of positions under activation
    checkpointing (the full-vocabulary logits never exist for all positions at once), fused AdamW; at micro-batch
    16 and a larger micro-batch; --compile adds a variant with the decoder under torch.compile.
  tokens/s and MFU = 4 * N * tokens/s / peak (N = base parameter count; 4N: forward 2N + input-gradient 2N, the
  frozen base has no weight gradient), peak = 989 TFLOP/s dense bf16 (H100 SXM / H200).

    python bench/gpu_fast.py                       # on the GPU machine; writes $OUT/gpu_fast.json if $OUT is set
    python bench/gpu_fast.py --device cpu --tiny   # tiny shapes, checks the script end to end on a CPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_studio.components.fastgen import fast_generate, plain_generate, release_fast_generators  # noqa: E402
from rlhf_studio.components.model_utils import causal_lm_of  # noqa: E402

PEAK_BF16 = 989e12
EOS, PAD = 2, 1

SHAPES = {
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=8192, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048),
}
TINY = {
    "tiny-a": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=512),
    "tiny-b": dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=192, vocab_size=640, tie_word_embeddings=True, max_position_embeddings=512),
}


def log(*a):
    print(*a, flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def build(shape: dict, dev, dtype, seed=0, lora=True):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**shape, bos_token_id=0, eos_token_id=EOS, pad_token_id=PAD, rope_theta=10000.0,
                      rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg)
    model.to(dtype)
    try:
        model.set_attn_implementation("sdpa")
    except Exception as e:  # noqa: BLE001
        log(f"  (sdpa not set: {e})")
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    n_base = sum(p.numel() for p in model.parameters())
    if not lora:
        return model.eval(), n_base
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
                        adapter_name="policy")
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))
    return pm.eval(), n_base


def prompts(B, T, V, dev, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randint(3, V, (B, T), generator=g)
    return x.to(dev), torch.ones_like(x).to(dev)


def timed(fn, dev, reps=1):
    ts, out = [], None
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    return out, min(ts)


def agreement(a: torch.Tensor, b: torch.Tensor, T: int) -> dict:
    ra, rb = a[:, T:], b[:, T:]
    R = min(ra.shape[1], rb.shape[1])
    ra, rb = ra[:, :R], rb[:, :R]
    eq = ra == rb
    prefix = torch.where(eq.all(1), torch.full_like(eq[:, 0], R, dtype=torch.long), (~eq).float().argmax(1).long())
    return {"rows_identical": int((eq.all(1) & (a.shape == b.shape)).sum()), "rows": int(a.shape[0]),
            "token_agreement": round(float(eq.float().mean()), 4), "first_token_agreement": round(
                float(eq[:, 0].float().mean()), 4), "mean_common_prefix": round(float(prefix.float().mean()), 2),
            "tokens": R, "identical": bool(torch.equal(a, b))}


# ----------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------

def bench_generation(name, shape, args, dev, res):
    B, T, N = args.batch, args.prompt_len, args.new_tokens
    model, n_base = build(shape, dev, torch.bfloat16 if dev.type == "cuda" or args.bf16 else torch.float32)
    V = shape["vocab_size"]
    x, m = prompts(B, T, V, dev)
    kw = dict(eos_token_id=EOS, pad_token_id=PAD)
    r = {"shape": name, "params_base": n_base, "batch": B, "prompt_len": T, "new_tokens": N}

    # baseline: model.generate (sampling, temperature 1, top-p 1, no top-k)
    plain_generate(model, x, m, 4, temperature=1.0, top_p=1.0, **kw)                  # warm-up
    out, t = timed(lambda: plain_generate(model, x, m, N, temperature=1.0, top_p=1.0, **kw), dev, args.gen_reps)
    base_tok = B * out.response_ids.shape[1]
    r["generate_s"], r["generate_tok_s"] = round(t, 4), round(base_tok / t, 1)
    log(f"  {name}: generate        {t:8.3f} s  {base_tok / t:10.1f} tok/s  (R={out.response_ids.shape[1]})")

    # fast path: first call captures the graph
    g = torch.Generator(device=dev).manual_seed(0)
    first, t_first = timed(lambda: fast_generate(model, x, m, N, temperature=1.0, top_p=1.0, generator=g, **kw), dev)
    r["fast_first_call_s"] = round(t_first, 4)
    r["fast_path"] = first.info["path"]
    r["fast_merged"] = first.info["merged"]
    out, t = timed(lambda: fast_generate(model, x, m, N, temperature=1.0, top_p=1.0, generator=g, **kw), dev,
                   args.fast_reps)
    tok = B * out.response_ids.shape[1]
    r["fast_s"], r["fast_tok_s"] = round(t, 4), round(tok / t, 1)
    r["speedup"] = round((tok / t) / (base_tok / r["generate_s"]), 2)
    log(f"  {name}: fast ({out.info['path']}, merged={out.info['merged']})  {t:8.3f} s  {tok / t:10.1f} tok/s  "
        f"x{r['speedup']}  (first call {t_first:.3f} s, R={out.response_ids.shape[1]})")
    # top-p 0.9 (sort in the step)
    out, t = timed(lambda: fast_generate(model, x, m, N, temperature=1.0, top_p=0.9, generator=g, **kw), dev, 1)
    out, t = timed(lambda: fast_generate(model, x, m, N, temperature=1.0, top_p=0.9, generator=g, **kw), dev,
                   args.fast_reps)
    r["fast_top_p0.9_tok_s"] = round(B * out.response_ids.shape[1] / t, 1)
    log(f"  {name}: fast top_p=0.9   {t:8.3f} s  {r['fast_top_p0.9_tok_s']:10.1f} tok/s")
    # unmerged LoRA inside the graph: what the PPO trainer's rollouts run in bf16 (exactly the trained policy)
    fast_generate(model, x, m, N, temperature=1.0, generator=g, merge_lora=False, **kw)
    out, t = timed(lambda: fast_generate(model, x, m, N, temperature=1.0, generator=g, merge_lora=False, **kw), dev,
                   args.fast_reps)
    r["fast_unmerged_tok_s"] = round(B * out.response_ids.shape[1] / t, 1)
    log(f"  {name}: fast, LoRA unmerged ({out.info['path']})  {t:8.3f} s  {r['fast_unmerged_tok_s']:10.1f} tok/s  "
        f"x{r['fast_unmerged_tok_s'] / r['generate_tok_s']:.2f}")
    if dev.type == "cuda":
        fast_generate(model, x, m, N, temperature=1.0, generator=g, use_cuda_graph=False, **kw)
        out, t = timed(lambda: fast_generate(model, x, m, N, temperature=1.0, generator=g, use_cuda_graph=False,
                                             **kw), dev, 1)
        r["fast_eager_tok_s"] = round(B * out.response_ids.shape[1] / t, 1)
        log(f"  {name}: fast, no graph   {t:8.3f} s  {r['fast_eager_tok_s']:10.1f} tok/s")

    # greedy agreement in this dtype (bf16 on the GPU): merged fast vs unmerged generate, and unmerged fast
    G = args.greedy_tokens
    ref = plain_generate(model, x, m, G, temperature=0, **kw).sequences
    fm = fast_generate(model, x, m, G, temperature=0, **kw).sequences
    fu = fast_generate(model, x, m, G, temperature=0, merge_lora=False, **kw).sequences
    r["greedy_model_dtype_merged_vs_generate"] = agreement(fm, ref, T)
    r["greedy_model_dtype_unmerged_vs_generate"] = agreement(fu, ref, T)
    log(f"  {name}: greedy {str(next(model.parameters()).dtype)[6:]} merged vs generate: "
        f"{r['greedy_model_dtype_merged_vs_generate']}")
    log(f"  {name}: greedy {str(next(model.parameters()).dtype)[6:]} unmerged vs generate: "
        f"{r['greedy_model_dtype_unmerged_vs_generate']}")
    release_fast_generators()
    if dev.type == "cuda":
        r["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2)
    res["generation"].append(r)


def greedy_fp32_check(name, shape, args, dev, res):
    """fp32, LoRA active, left-padded prompts of different lengths: fast (merged) must equal generate."""
    model, _ = build(shape, dev, torch.float32, seed=3)
    B, T, G = args.batch, args.prompt_len, args.greedy_tokens
    x, m = prompts(B, T, shape["vocab_size"], dev, seed=3)
    lens = torch.randint(T // 4, T + 1, (B,), generator=torch.Generator().manual_seed(4)).to(dev)
    m = (torch.arange(T, device=dev).unsqueeze(0) >= (T - lens).unsqueeze(1)).long()
    x = torch.where(m.bool(), x, torch.full_like(x, PAD))
    kw = dict(eos_token_id=EOS, pad_token_id=PAD)
    ref = plain_generate(model, x, m, G, temperature=0, **kw).sequences
    out = fast_generate(model, x, m, G, temperature=0, **kw)
    a = agreement(out.sequences, ref, T)
    a["merged"] = out.info["merged"]
    a["path"] = out.info["path"]
    res["greedy_fp32"] = {"shape": name, **a}
    log(f"  {name}: greedy fp32 (LoRA, left-padded) fast vs generate: {a}")
    release_fast_generators()


# ----------------------------------------------------------------------------------------------------------
# LoRA training step
# ----------------------------------------------------------------------------------------------------------

def _ce_chunk(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y, reduction="sum")


def chunked_ce(hidden, weight, targets, chunk):
    """Mean token cross-entropy with logits built `chunk` positions at a time and recomputed in backward."""
    from torch.utils.checkpoint import checkpoint
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        total = total + checkpoint(_ce_chunk, h[i:i + chunk], weight, y[i:i + chunk], use_reentrant=False)
    return total / y.numel()


def bench_training(name, shape, args, dev, res):
    model, n_base = build(shape, dev, torch.bfloat16 if dev.type == "cuda" or args.bf16 else torch.float32, lora=True)
    model.train()
    V = shape["vocab_size"]
    S, MB = args.train_seq, args.train_batch
    lm = causal_lm_of(model)
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator(device="cpu").manual_seed(9)

    def data(mb):
        return torch.randint(3, V, (mb, S), generator=g).to(dev)

    def baseline_step(opt, x):
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    dec = decoder
    if args.compile and dev.type == "cuda" and name in args.compile_shapes.split(","):
        dec = torch.compile(decoder)

    def fast_step(opt, x, decoder=decoder):
        ac = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" or args.bf16 else \
            torch.autocast(dev.type, enabled=False)
        with ac:
            h = decoder(input_ids=x, use_cache=False).last_hidden_state
            loss = chunked_ce(h[:, :-1], head.weight, x[:, 1:], args.ce_chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def compiled_step(opt, x):
        return fast_step(opt, x, decoder=dec)

    variants = [(f"baseline (full logits, mb{MB})", baseline_step, MB, False),
                (f"optimised (autocast, chunked CE, fused AdamW), mb{MB}", fast_step, MB, True),
                (f"optimised, mb{args.train_big_batch}", fast_step, args.train_big_batch, True)]
    if dec is not decoder:   # one compiled variant beside the eager ones (one shape, so one compilation)
        variants.append((variants[2][0] + " + compile", compiled_step, args.train_big_batch, True))
    rows = []
    for label, step, mb, fused in variants:
        fused_ok = fused and dev.type == "cuda"
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True) if fused_ok else torch.optim.AdamW(params, lr=1e-5)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            for _ in range(args.train_warmup):
                step(opt, data(mb))
            xs = [data(mb) for _ in range(args.train_steps)]
            sync(dev)
            t0 = time.perf_counter()
            for x in xs:
                loss = step(opt, x)
            sync(dev)
            dt = (time.perf_counter() - t0) / args.train_steps
        except Exception as e:  # noqa: BLE001  (out of memory, a compile failure: report it, go on)
            log(f"  {name}: {label}: FAILED {type(e).__name__}: {str(e)[:300]}")
            opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        tps = mb * S / dt
        row = {"variant": label, "micro_batch": mb, "seq": S, "step_s": round(dt, 4), "tok_s": round(tps, 1),
               "loss": round(float(loss), 4)}
        if dev.type == "cuda":
            row["mfu_pct"] = round(100 * 4 * n_base * tps / PEAK_BF16, 2)
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2)
        rows.append(row)
        log(f"  {name}: train {label:55s} {dt * 1000:9.1f} ms/step {tps:10.1f} tok/s"
            + (f"  MFU {row['mfu_pct']:.1f}%  peak {row['peak_mem_gib']} GiB" if "mfu_pct" in row else ""))
        del opt
    base_tps = rows[0]["tok_s"] if rows else None
    for row in rows:
        row["vs_baseline"] = round(row["tok_s"] / base_tps, 2) if base_tps else None
    res["training"].append({"shape": name, "params_base": n_base, "variants": rows})


# ----------------------------------------------------------------------------------------------------------

def free(dev):
    import gc
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and budgets (a CPU check of the script)")
    ap.add_argument("--shapes", default=None, help="comma list of shapes (default: all of the mode)")
    ap.add_argument("--skip-gen", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="add a variant with the decoder under torch.compile (CUDA; the shapes of --compile-shapes)")
    ap.add_argument("--compile-shapes", default="1.7b", help="comma list of shapes that get the compiled variant")
    ap.add_argument("--bf16", action="store_true", help="bf16 on the CPU too")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_fast.json when $OUT is set)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    shapes = TINY if args.tiny else SHAPES
    if args.shapes:
        shapes = {k: v for k, v in {**SHAPES, **TINY}.items() if k in args.shapes.split(",")}
    if args.tiny:
        args.batch, args.prompt_len, args.new_tokens, args.greedy_tokens = 4, 16, 16, 12
        args.gen_reps, args.fast_reps = 1, 2
        args.train_seq, args.train_batch, args.train_big_batch = 32, 4, 8
        args.train_warmup, args.train_steps, args.ce_chunk = 1, 2, 48
    else:
        args.batch, args.prompt_len, args.new_tokens, args.greedy_tokens = 64, 64, 128, 32
        args.gen_reps, args.fast_reps = 1, 3
        args.train_seq, args.train_batch, args.train_big_batch = 256, 16, 32
        args.train_warmup, args.train_steps, args.ce_chunk = 2, 4, 2048
    import peft
    import transformers
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "cuda": torch.version.cuda, "tiny": args.tiny, "peak_bf16_flops": PEAK_BF16,
           "mfu_flops_per_token": "4*N (N = base parameter count)", "generation": [], "training": []}
    log(f"device {res['device']}  torch {res['torch']}  transformers {res['transformers']}  peft {res['peft']}")
    t_all = time.perf_counter()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False   # the fp32 greedy check compares exact fp32 arithmetic
    if not args.skip_gen:
        log(f"== generation: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, LoRA r=16")
        first = next(iter(shapes))
        for name, shape in shapes.items():
            bench_generation(name, shape, args, dev, res)
            free(dev)
            if name == first:
                greedy_fp32_check(name, shape, args, dev, res)
                free(dev)
    if not args.skip_train:
        log(f"== LoRA training step: {args.train_batch} x {args.train_seq} tokens, r=16 all-linear")
        for name, shape in shapes.items():
            bench_training(name, shape, args, dev, res)
            free(dev)
    res["total_s"] = round(time.perf_counter() - t_all, 1)

    log("\n| shape | generate tok/s | fast tok/s | speedup | fast path | first call s | unmerged tok/s |"
        " greedy fp32 identical |")
    log("|---|---|---|---|---|---|---|---|")
    for r in res["generation"]:
        fp = res.get("greedy_fp32", {})
        ident = fp.get("identical") if fp.get("shape") == r["shape"] else "-"
        log(f"| {r['shape']} | {r['generate_tok_s']} | {r['fast_tok_s']} | x{r['speedup']} | {r['fast_path']}"
            f"{' merged' if r['fast_merged'] else ''} | {r['fast_first_call_s']} | {r['fast_unmerged_tok_s']} | {ident} |")
    if res["training"]:
        log("\n| shape | train variant | tok/s | MFU % | vs baseline | peak GiB |")
        log("|---|---|---|---|---|---|")
        for t in res["training"]:
            for v in t["variants"]:
                log(f"| {t['shape']} | {v['variant']} | {v['tok_s']} | {v.get('mfu_pct', '-')} | "
                    f"x{v['vs_baseline']} | {v.get('peak_mem_gib', '-')} |")
    log(f"\ntotal {res['total_s']} s")
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_fast.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2))
        log(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
