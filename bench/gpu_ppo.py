"""Short PPO runs on a CUDA GPU: base in bf16, 8-bit and 4-bit (bitsandbytes), three model shapes, random weights.

No hub, no network: the models are built from hand-written configs (SmolLM2-135M, a Qwen2.5-0.5B-like and a
SmolLM2-1.7B-like shape) with random weights; the 8/4-bit variants are the same random weights saved once and
reloaded through transformers' BitsAndBytesConfig (the path `components.models.load_model` uses).

Random weights give a near-uniform next-token distribution that PPO can hardly move in a few steps, so the
final norm's weight is scaled so that the random logits have a standard deviation of --logit-std (peaked like
a trained LM's); the residual stream and the layers are left as initialised.
Synthetic reward (uses the reference pass's base hidden states, like the app's fast reward):
    score = 2 * mean over response tokens of s(token)  +  0.1 * random linear head on pooled base features,
s(token) = standardised projection of the token's output embedding on a fixed random direction: dense (every
token carries signal) and reachable by turning the final hidden state, so it must rise within a few steps.

Per (shape, quantization): seconds per PPO step (median after 1 warm-up), tokens/s, peak memory
(torch.cuda.max_memory_allocated) next to components.ppo.estimate_memory, loss finiteness and whether the
score rose (mean of the last 3 steps > mean of the first 2 + margin). Prints a table; writes JSON to $OUT.

    python bench/gpu_ppo.py                                   # everything, ~4-5 min on an H100
    python bench/gpu_ppo.py --device cpu --shapes 135m --quant none --steps 2     # CPU smoke test
    python bench/gpu_ppo.py --device cpu --shapes tiny --quant none              # CPU: does the reward rise?
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SHAPES = {
    "tiny": dict(kind="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=49152,
                 max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True),
    "135m": dict(kind="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    "0.5b": dict(kind="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, head_dim=64, vocab_size=151936,
                 max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
    "1.7b": dict(kind="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=32, num_key_value_heads=32, head_dim=64, vocab_size=49152,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=130000.0, tie_word_embeddings=True),
}
EOS, PAD, BOS = 2, 0, 1


def build_config(name: str):
    from transformers import LlamaConfig, Qwen2Config
    s = dict(SHAPES[name])
    kind = s.pop("kind")
    theta = s.pop("rope_theta")
    common = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, attention_dropout=0.0,
                  rope_parameters={"rope_type": "default", "rope_theta": theta}, use_cache=True)
    if kind == "qwen2":
        return Qwen2Config(**s, **common)
    return LlamaConfig(**s, attention_bias=False, mlp_bias=False, **common)


class IdTokenizer:
    """Stand-in tokenizer for random weights: prompts are token-id lists, decode prints ids."""
    eos_token_id, pad_token_id, bos_token_id = EOS, PAD, BOS
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in (EOS, PAD, BOS)))


def save_random_model(name: str, folder: Path, logit_std: float, seed: int = 0) -> None:
    """Random weights of shape `name`, final norm scaled so the logits have std ~logit_std, saved in bf16."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = build_config(name)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        # logits = norm(x) . e with |norm(x)| ~ sqrt(H) * w and e ~ N(0, std_e^2): std ~ w * sqrt(H) * std_e
        std_e = float(m.get_output_embeddings().weight.float().std())
        m.get_decoder().norm.weight.fill_(logit_std / (std_e * cfg.hidden_size ** 0.5))
    m.save_pretrained(str(folder))
    del m


def load(folder: Path, quant: str, device: torch.device, dtype: torch.dtype):
    """A components.models.LoadedModel around the saved random model (quantized through bitsandbytes)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from components.models import LoadedModel
    kwargs = dict(dtype=dtype)
    if quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16,
                                                           bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": device.index or 0}
    elif quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if quant == "none":
        model.to(device)
    model.eval()
    model.generation_config.pad_token_id = PAD
    return LoadedModel(model=model, tokenizer=IdTokenizer(), model_id=f"random:{folder.name}", revision="random",
                       device=device, dtype=dtype, quantization=None if quant == "none" else quant,
                       source_path=str(folder), lock=threading.RLock())


class SyntheticReward:
    """A dense synthetic reward that PPO can move on random weights, plus the base-hidden path of the app:

        score = 2 * mean over response tokens of s(token)  +  0.1 * random linear head on pooled base features

    s(token) = standardised projection of the token's output embedding on a random direction u: the policy
    raises it by turning its final hidden state towards u (every sampled token carries signal).
    """
    uses_base_hidden = True

    def __init__(self, output_embeddings: torch.Tensor, hidden_size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(output_embeddings.shape[1], generator=g).to(output_embeddings.device)
        s = output_embeddings.float() @ u
        self.token_score = ((s - s.mean()) / s.std()).detach()
        self.w = torch.randn(2 * hidden_size, generator=g) / math.sqrt(2 * hidden_size)

    @torch.no_grad()
    def __call__(self, *, model, input_ids, attention_mask, response_mask, base_hidden=None):
        from components.reward.features import pool_features
        ts = self.token_score.to(input_ids.device)[input_ids] * response_mask
        tok = ts.sum(1) / response_mask.sum(1).clamp(min=1)
        feats = pool_features(base_hidden, attention_mask, response_mask)
        feats = feats / feats.norm(dim=1, keepdim=True).clamp(min=1e-6)
        return 2.0 * tok + 0.1 * math.sqrt(feats.shape[1]) * (feats @ self.w.to(feats.device))


def random_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(16, 65, (1,), generator=g))
        out.append(torch.randint(3, vocab, (length,), generator=g).tolist())
    return out


def random_trainer(shape: str, device: torch.device, dtype: torch.dtype, n_prompts: int, logit_std: float = 3.0,
                   **config):
    """(trainer, prompts): a PPOTrainer on random weights of `shape` (loaded from a temporary folder), the
    synthetic reward, `n_prompts` random prompts and PPOConfig(**config). For the GPU scripts beside this one."""
    from components.ppo import PPOConfig, PPOTrainer
    folder = Path(tempfile.mkdtemp(prefix=f"ppo_{shape}_"))
    try:
        save_random_model(shape, folder, logit_std)
        lm = load(folder, "none", device, dtype)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    prompts = random_prompts(n_prompts, lm.model.config.vocab_size, seed=0)
    reward = SyntheticReward(lm.model.get_output_embeddings().weight.detach(), lm.model.config.hidden_size)
    return PPOTrainer(lm, reward, PPOConfig(**config), prompts, device=device), prompts


def run_one(shape: str, quant: str, folder: Path, args, device: torch.device) -> dict:
    from components.ppo import PPOConfig, PPOTrainer, estimate_memory
    dtype = torch.bfloat16 if device.type == "cuda" else (torch.float32 if args.cpu_dtype == "fp32"
                                                            else torch.bfloat16)
    res = {"shape": shape, "quant": quant, "dtype": str(dtype).replace("torch.", ""), "ok": False}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    lm = load(folder, quant, device, dtype)
    res["load_s"] = round(time.perf_counter() - t0, 1)
    cfg = PPOConfig(steps=args.steps, batch_size=args.batch, mini_batch_size=args.mini_batch,
                    grad_accum=args.grad_accum, ppo_epochs=args.epochs, max_new_tokens=args.new_tokens,
                    max_prompt_tokens=64, temperature=1.0, lr=args.lr, kl_coef=0.01, missing_eos_penalty=0.0,
                    lora_r=16, lora_alpha=32, seed=0, value_head_init="zeros", compile=args.compile,
                    merge_for_generation=args.merge, lora_precision=args.lora_precision,
                    pack_rows=args.pack_rows == "on")
    est = estimate_memory(lm.model.config, cfg, quantization=None if quant == "none" else quant,
                          dtype="bf16" if dtype == torch.bfloat16 else "fp32", device=device.type)
    res["estimate_gib"] = est["gib"]
    prompts = random_prompts(64, lm.model.config.vocab_size, seed=0)
    reward = SyntheticReward(lm.model.get_output_embeddings().weight.detach(), lm.model.config.hidden_size)
    trainer = PPOTrainer(lm, reward, cfg, prompts, device=device)
    res["trainable_params"] = sum(p.numel() for p in trainer._params)
    res["merged_rollout"] = trainer.merge_for_generation
    res["half_lora"] = trainer.half_lora
    res["packed_rows"], res["lora_siblings"] = trainer.pack_rows, args.lora_siblings == "on"
    hist = []
    t_start = None   # the time limit counts from the end of the first step, which holds any compilation
    for _ in range(cfg.steps):
        m = trainer.step()
        m.pop("samples", None)
        hist.append(m)
        t_start = t_start or time.perf_counter()
        if args.max_seconds and time.perf_counter() - t_start > args.max_seconds and len(hist) >= 3:
            res["stopped_early"] = True
            break
    # after training: where compiling failed, the trainer went on eagerly (and these say so)
    res["compiled"], res["compile_fallback"] = trainer.compiled, trainer.compile_fallback
    if device.type == "cuda":
        torch.cuda.synchronize()
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    keys = ("policy_loss", "value_loss", "kl", "entropy", "approx_kl", "reward_mean", "grad_norm")
    res["finite"] = all(math.isfinite(m[k]) for m in hist for k in keys)
    timed = hist[1:] if len(hist) > 1 else hist
    res["steps"] = len(hist)
    res["first_step_s"] = round(hist[0]["t_step"], 2)   # includes the compilation when compiled
    # rates come from the unrounded medians: a phase of ~0.43 s rounded to 10 ms moves its rate by up to 1.2%
    s_per_step = statistics.median(m["t_step"] for m in timed)
    phases = {k: statistics.median(m[k] for m in timed)
              for k in ("t_generate", "t_policy", "t_reference", "t_score", "t_train")}
    res["s_per_step"] = round(s_per_step, 3)
    res["samples_per_s"] = round(cfg.batch_size / s_per_step, 2)
    res["phases"] = {k: round(v, 3) for k, v in phases.items()}
    res["t_train_by_step"] = [round(m["t_train"], 4) for m in hist]
    # training throughput in useful tokens (prompt + response, padding not counted), MFU by the 4*N count
    n_base = sum(p.numel() for p in lm.model.parameters()) if quant == "none" else None
    prompt_len = statistics.mean(len(p) for p in prompts)
    resp_len = statistics.median(m["response_len"] for m in timed)
    res["train_tok_s"] = round(cfg.ppo_epochs * cfg.batch_size * (prompt_len + resp_len) / phases["t_train"])
    res["generate_tok_s"] = round(cfg.batch_size * resp_len / phases["t_generate"])
    if n_base and device.type == "cuda":
        res["train_mfu_pct"] = round(100 * 4 * n_base * res["train_tok_s"] / 989e12, 2)
    scores = [m["score_mean"] for m in hist]
    res["score_first"] = round(statistics.mean(scores[:2]), 3)
    res["score_last"] = round(statistics.mean(scores[-3:]), 3)
    res["score_curve"] = [round(s, 3) for s in scores]
    res["kl_last"] = round(hist[-1]["kl"], 3)
    res["rises"] = res["score_last"] > res["score_first"] + 0.1
    res["ok"] = res["finite"]
    del trainer, lm, reward
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def write_json(args, info, results, total) -> str:
    out = {"info": info, "args": vars(args), "total_s": round(total, 1), "results": results}
    dest = args.json or (os.path.join(os.environ["OUT"], "gpu_ppo.json") if os.environ.get("OUT") else "")
    if dest:
        Path(dest).write_text(json.dumps(out, indent=1))
    return dest


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="135m,0.5b,1.7b")
    ap.add_argument("--quant", default="none,8bit,4bit", help="comma list of none (bf16), 8bit, 4bit")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--mini-batch", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--logit-std", type=float, default=3.0)
    ap.add_argument("--max-seconds", type=float, default=40.0, help="per configuration, after its first step (which holds any compilation); 0 = no limit")
    ap.add_argument("--cpu-dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--compile", choices=["off", "on", "auto"], default="off", help="PPOConfig.compile")
    ap.add_argument("--lora-precision", choices=["auto", "fp32", "half"], default="auto",
                    help="PPOConfig.lora_precision")
    ap.add_argument("--merge", choices=["off", "on", "auto"], default="auto", help="PPOConfig.merge_for_generation")
    ap.add_argument("--pack-rows", choices=["on", "off"], default="on", help="PPOConfig.pack_rows")
    ap.add_argument("--lora-siblings", choices=["on", "off"], default="on",
                    help="one x A^T matmul for q/k/v and gate/up (components.fused_lora.SHARE_SIBLING_INPUTS)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    import components.fused_lora
    components.fused_lora.SHARE_SIBLING_INPUTS = args.lora_siblings == "on"

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --device cpu")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    quants = [q.strip() for q in args.quant.split(",") if q.strip()]
    for q in quants:
        if q not in ("none", "8bit", "4bit"):
            sys.exit(f"unknown quantization {q!r}")
        if q != "none" and device.type != "cuda":
            sys.exit("8bit/4bit need CUDA (bitsandbytes)")
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    try:
        import transformers, peft  # noqa: E401
        info.update(transformers=transformers.__version__, peft=peft.__version__)
        if "8bit" in quants or "4bit" in quants:
            import bitsandbytes
            info["bitsandbytes"] = bitsandbytes.__version__
    except Exception as e:  # reported, the runs below will fail loudly
        info["import_error"] = repr(e)
    print(json.dumps(info), flush=True)
    results = []
    t_all = time.perf_counter()
    for shape in shapes:
        folder = Path(tempfile.mkdtemp(prefix=f"ppo_rand_{shape}_"))
        try:
            t0 = time.perf_counter()
            save_random_model(shape, folder, args.logit_std)
            print(f"[{shape}] random weights saved in {time.perf_counter() - t0:.1f}s", flush=True)
            for q in quants:
                try:
                    r = run_one(shape, q, folder, args, device)
                except Exception as e:
                    r = {"shape": shape, "quant": q, "ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
                    traceback.print_exc()
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                results.append(r)
                print(json.dumps(r), flush=True)
                write_json(args, info, results, time.perf_counter() - t_all)   # partial results survive a kill
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    total = time.perf_counter() - t_all

    print(f"\nPPO on {info['device']}, batch {args.batch} x {args.new_tokens} new tokens, {args.epochs} epochs, "
          f"LoRA r=16; total {total:.0f}s\n")
    print("| shape | base | s/step | samples/s | generate | policy fwd | ref fwd | train | gen tok/s | train tok/s |"
          " train MFU % | peak GiB | est. GiB | finite | score first -> last | rises | merged rollout | compiled |"
          " half LoRA | packed rows | LoRA siblings | 1st step s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['shape']} | {r['quant']} | ERROR: {r['error'][:80]} |")
            continue
        ph = r["phases"]
        print(f"| {r['shape']} | {r['dtype'] if r['quant'] == 'none' else r['quant']} | {r['s_per_step']} | "
              f"{r['samples_per_s']} | {ph['t_generate']} | {ph['t_policy']} | {ph['t_reference']} | "
              f"{ph['t_train']} | {r['generate_tok_s']} | {r['train_tok_s']} | {r.get('train_mfu_pct', '-')} | "
              f"{r.get('peak_gib', '-')} | {r['estimate_gib']} | {r['finite']} | "
              f"{r['score_first']} -> {r['score_last']} | {r['rises']} | {r['merged_rollout']} | {r['compiled']} | "
              f"{r['half_lora']} | {r['packed_rows']} | {r['lora_siblings']} | "
              f"{r['first_step_s']} |")
    dest = write_json(args, info, results, total)
    if dest:
        print(f"wrote {dest}")
    bad = [r for r in results if not r.get("ok")]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
