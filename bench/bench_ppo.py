"""PPO speed, on the CPU or a CUDA GPU: one benchmark, two settings.

--device cpu (default): our trainer vs TRL 1.12.0's PPO trainer, side by side in one run, on the embedded
SmolLM2-135M-Instruct (TRL's harness in /work/shared/peers, or shared/peers in a checkout): 8 prompts per step,
32 new tokens, 4 PPO epochs, 1 minibatch, LoRA r=16 / alpha=32 on all linear layers, temperature 0.7,
missing-EOS penalty 1.0. TRL runs as a subprocess in its own virtualenv (.venv-trl, see the harness README);
ours runs in this process. Medians over `--steps` steps after `--warmup` steps. TRL scores with a second copy
of the backbone + scalar head (a full forward) and trains a full value model; ours scores with a linear head on
pooled base features that the reference pass already computed (uses_base_hidden) and reads values from a head
on the policy trunk: those are the levers being measured. `--plain` adds ours with the shared prompt prefix,
the fused LoRA forward and packed rows off (the ratio ours/ours-plain is computed in the same process).

--device cuda: short PPO runs on random-weight shapes (bench/random_models.py: 135M, a Qwen2.5-0.5B-like and a
1.7B-like shape), base in bf16, 8-bit and 4-bit (bitsandbytes), with a synthetic reward that uses the reference
pass's base hidden states like the app's fast reward. Per (shape, quantization): seconds per PPO step (median
after 1 warm-up), tokens/s, peak memory (torch.cuda.max_memory_allocated) next to
components.training.memory.estimate_memory, loss finiteness and whether the score rose (mean of the last 3
steps > mean of the first 2 + margin). Writes JSON to --json or $OUT/gpu_ppo.json. `--shapes` on the CPU runs
the same on the CPU (a smoke test). Without a GPU, --device cuda stops at once and says so.

    python bench/bench_ppo.py                      # CPU, fp32, both trainers
    python bench/bench_ppo.py --dtype both         # fp32 and bf16 (TRL bf16 = its bf16=True autocast)
    python bench/bench_ppo.py --skip-trl --plain   # ours only, with and without the shortcuts
    python bench/bench_ppo.py --device cuda        # every shape and base, ~4-5 min on an H100
    python bench/bench_ppo.py --shapes tiny --quant none              # CPU: does the reward rise?
Prints a table and the ratios; --json writes the numbers.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.random_models import SyntheticReward, load, random_prompts, save_random_model  # noqa: E402

PROMPTS = ["Give me one tip for writing a clear email.", "Explain photosynthesis to a child.",
           "Write a haiku about autumn.", "What is a good name for a cat?", "How do I boil an egg?",
           "Summarise the plot of Hamlet in one sentence.", "Why is the sky blue?", "Suggest a weekend hobby.",
           "What is the capital of Australia?", "Describe the smell of rain.", "How can I sleep better?",
           "Tell me a fun fact about octopuses.", "What should I cook tonight?", "Explain recursion briefly.",
           "Give a motivational quote.", "How do plants drink water?"]


# ----------------------------------------------------------------------------------------------------------
# --device cpu: ours vs TRL on the embedded model
# ----------------------------------------------------------------------------------------------------------

def find_harness() -> Path | None:
    for p in (ROOT / "shared" / "peers" / "trl_ppo_step.py", ROOT.parent / "shared" / "peers" / "trl_ppo_step.py"):
        if p.exists():
            return p
    return None


def run_trl(harness: Path, python: str, args, bf16: bool) -> dict:
    """Run TRL's harness (patched to bf16=True autocast when asked) and parse its RESULT line."""
    src = harness.read_text()
    if bf16:
        if "bf16=False" not in src:
            raise RuntimeError("cannot switch the TRL harness to bf16")
        src = src.replace("bf16=False", "bf16=True")
    with tempfile.TemporaryDirectory(prefix="trl_bench_") as d:
        script = Path(d) / "trl_ppo_step.py"
        script.write_text(src)
        cmd = [python, str(script), "--steps", str(args.steps + args.warmup), "--warmup", str(args.warmup),
               "--epochs", str(args.epochs), "--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=d, timeout=args.trl_timeout)
        wall = time.perf_counter() - t0
    m = re.search(r"^RESULT (\{.*\})$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        tail = (p.stdout + p.stderr)[-2000:]
        raise RuntimeError(f"TRL harness failed (rc {p.returncode}):\n{tail}")
    res = json.loads(m.group(1))
    res["wall_s"] = round(wall, 1)
    return res


def run_ours(args, dtype: str, **overrides) -> dict:
    from rlhf_studio.components.models import load_model
    from rlhf_studio.components.training.ppo import PPOConfig, PPOTrainer
    from rlhf_studio.components.training.rewards import LinearHeadReward
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = load_model("embedded", dtype=dtype)
    H = lm.model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    reward = LinearHeadReward(torch.randn(2 * H, generator=g) / (2 * H) ** 0.5, 0.0)
    cfg = PPOConfig(steps=args.steps + args.warmup, batch_size=args.batch, mini_batch_size=args.batch,
                    ppo_epochs=args.epochs, max_new_tokens=args.new_tokens, temperature=0.7, lr=1e-4,
                    lora_r=16, lora_alpha=32, missing_eos_penalty=1.0, seed=0,
                    merge_for_generation=args.merge, old_logprobs=args.old_logprobs, **overrides)
    trainer = PPOTrainer(lm, reward, cfg, PROMPTS)
    load_s = time.perf_counter() - t0
    steps = [trainer.step() for _ in range(cfg.steps)]
    meas = steps[args.warmup:]
    keys = ["t_generate", "t_policy", "t_reference", "t_score", "t_train"]
    med = statistics.median(m["t_step"] for m in meas)
    return {"dtype": dtype, "threads": torch.get_num_threads(), "load_s": round(load_s, 1),
            "all_step_s": [round(m["t_step"], 2) for m in steps], "median_step_s": round(med, 2),
            "samples_per_s": round(args.batch / med, 3),
            "phase_median_s": {k: round(statistics.median(m[k] for m in meas), 2) for k in keys},
            "response_len": [round(m["response_len"], 1) for m in steps],
            "trainable_params": sum(p.numel() for p in trainer._params)}


def fmt_row(name, r, phases):
    ph = r["phase_median_s"]
    cells = [name, f"{r['median_step_s']:.2f}", f"{r['samples_per_s']:.3f}"] + [
        f"{ph[k]:.2f}" if k in ph else "" for k in phases]
    return "| " + " | ".join(cells) + " |"


def cpu_main(args):
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    harness = find_harness()
    results = {}
    for dt in dtypes:
        if not args.skip_trl:
            if harness is None or not Path(args.trl_python).exists():
                print(f"TRL harness or {args.trl_python} missing: see shared/peers/README.md", file=sys.stderr)
                sys.exit(2)
            print(f"[bench] TRL {dt} ...", flush=True)
            results[f"trl_{dt}"] = run_trl(harness, args.trl_python, args, bf16=(dt == "bf16"))
            print(f"[bench] TRL {dt}: {results[f'trl_{dt}']['median_step_s']} s/step", flush=True)
        print(f"[bench] ours {dt} ...", flush=True)
        results[f"ours_{dt}"] = run_ours(args, dt)
        print(f"[bench] ours {dt}: {results[f'ours_{dt}']['median_step_s']} s/step", flush=True)
        if args.plain:
            results[f"plain_{dt}"] = run_ours(args, dt, share_prompt_prefix=False, fused_lora=False,
                                               pack_rows=False)
            print(f"[bench] ours {dt}, plain: {results[f'plain_{dt}']['median_step_s']} s/step", flush=True)

    print(f"\n{args.batch} prompts x {args.new_tokens} new tokens, {args.epochs} PPO epochs, LoRA r=16; medians of "
          f"{args.steps} steps after {args.warmup} warm-up; {os.cpu_count()} CPUs\n")
    print("| trainer | s/step | samples/s | generate | rollout fwd (policy/value) | reference | score | train |")
    print("|---|---|---|---|---|---|---|---|")
    for dt in dtypes:
        if f"trl_{dt}" in results:
            r = results[f"trl_{dt}"]
            ph = r["phase_median_s"]
            train = ph.get("train_fwd", 0) + ph.get("backward+optim+rest", 0)
            print(f"| TRL 1.12 {dt}{' (autocast)' if dt == 'bf16' else ''} | {r['median_step_s']:.2f} | "
                  f"{r['samples_per_s']:.3f} | {ph.get('generate', 0):.2f} | (from generation) | "
                  f"{ph.get('ref_fwd', 0):.2f} | {ph.get('score_fwd(reward+value)', 0):.2f} (reward+value) | "
                  f"{train:.2f} |")
        for key, name in ((f"plain_{dt}", f"ours {dt}, no shared prefix, peft LoRA forward"),
                          (f"ours_{dt}", f"ours {dt}")):
            if key not in results:
                continue
            r = results[key]
            ph = r["phase_median_s"]
            print(f"| {name} | {r['median_step_s']:.2f} | {r['samples_per_s']:.3f} | {ph['t_generate']:.2f} | "
                  f"{ph['t_policy']:.2f} | {ph['t_reference']:.2f} | {ph['t_score']:.2f} | {ph['t_train']:.2f} |")
    print()
    for dt in dtypes:
        if f"trl_{dt}" in results:
            ratio = results[f"ours_{dt}"]["samples_per_s"] / results[f"trl_{dt}"]["samples_per_s"]
            results[f"ratio_{dt}"] = round(ratio, 2)
            print(f"samples/s ratio ours/TRL ({dt}): {ratio:.2f}x")
        if f"plain_{dt}" in results:
            print(f"samples/s ratio ours/ours-plain ({dt}): "
                  f"{results[f'ours_{dt}']['samples_per_s'] / results[f'plain_{dt}']['samples_per_s']:.2f}x")
    if "ours_fp32" in results and "trl_fp32" in results and "ours_bf16" in results:
        print(f"samples/s ratio ours bf16 / TRL fp32: "
              f"{results['ours_bf16']['samples_per_s'] / results['trl_fp32']['samples_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


# ----------------------------------------------------------------------------------------------------------
# --device cuda (or --shapes): random-weight shapes, bf16 / 8-bit / 4-bit
# ----------------------------------------------------------------------------------------------------------

def run_one(shape: str, quant: str, folder: Path, args, device: torch.device) -> dict:
    from rlhf_studio.components.training.memory import estimate_memory
    from rlhf_studio.components.training.ppo import PPOConfig, PPOTrainer
    dtype = torch.bfloat16 if device.type == "cuda" else (torch.float32 if args.dtype == "fp32"
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


def shapes_main(args):
    import rlhf_studio.components.fused_lora
    from rlhf_studio import components
    components.fused_lora.SHARE_SIBLING_INPUTS = args.lora_siblings == "on"
    device = torch.device(args.device)
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


# ----------------------------------------------------------------------------------------------------------
# Settings and dispatch
# ----------------------------------------------------------------------------------------------------------

# the defaults that differ between the two settings: (CPU vs TRL on the embedded model, random shapes)
DEFAULTS = {"steps": (4, 8), "batch": (8, 16), "epochs": (4, 2), "dtype": ("fp32", "fp32")}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (CPU: after --warmup; default 4 / 8)")
    ap.add_argument("--batch", type=int, default=None, help="prompts per step (default 8 / 16)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=None, help="PPO epochs (default 4 / 2)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default=None,
                    help="the CPU's base dtype (both: CPU setting only); a GPU runs bf16")
    ap.add_argument("--merge", choices=["auto", "on", "off"], default="auto", help="PPOConfig.merge_for_generation")
    ap.add_argument("--json", default="")
    cpu = ap.add_argument_group("--device cpu (ours vs TRL on the embedded model)")
    cpu.add_argument("--warmup", type=int, default=2)
    cpu.add_argument("--threads", type=int, default=0)
    cpu.add_argument("--old-logprobs", choices=["auto", "forward", "generation"], default="auto",
                     help="our old_logprobs setting (auto: from generation for fp32, one forward for bf16)")
    cpu.add_argument("--skip-trl", action="store_true")
    cpu.add_argument("--plain", action="store_true",
                     help="also run ours with the shared prompt prefix, the fused LoRA forward and packed rows off")
    cpu.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    cpu.add_argument("--trl-timeout", type=int, default=1800)
    gpu = ap.add_argument_group("--device cuda, or --shapes on the CPU (random-weight shapes)")
    gpu.add_argument("--shapes", default=None, help="comma list of tiny, 135m, 0.5b, 1.7b (cuda: 135m,0.5b,1.7b)")
    gpu.add_argument("--quant", default="none,8bit,4bit", help="comma list of none (bf16), 8bit, 4bit")
    gpu.add_argument("--mini-batch", type=int, default=16)
    gpu.add_argument("--grad-accum", type=int, default=1)
    gpu.add_argument("--lr", type=float, default=3e-4)
    gpu.add_argument("--logit-std", type=float, default=3.0)
    gpu.add_argument("--max-seconds", type=float, default=40.0,
                     help="per configuration, after its first step (which holds any compilation); 0 = no limit")
    gpu.add_argument("--compile", choices=["off", "on", "auto"], default="off", help="PPOConfig.compile")
    gpu.add_argument("--lora-precision", choices=["auto", "fp32", "half"], default="auto",
                     help="PPOConfig.lora_precision")
    gpu.add_argument("--pack-rows", choices=["on", "off"], default="on", help="PPOConfig.pack_rows")
    gpu.add_argument("--lora-siblings", choices=["on", "off"], default="on",
                     help="one x A^T matmul for q/k/v and gate/up (components.fused_lora.SHARE_SIBLING_INPUTS)")
    args = ap.parse_args()
    shapes = args.device == "cuda" or args.shapes is not None
    for name, both in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, both[shapes])
    if args.shapes is None:
        args.shapes = "135m,0.5b,1.7b"
    return args, shapes


def main():
    args, shapes = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_ppo.py --device cuda: no CUDA device here (torch.cuda.is_available() is False); "
                 "run --device cpu, or --shapes tiny --quant none for the random-shape run on the CPU")
    if shapes and args.dtype == "both":
        sys.exit("--dtype both is for the CPU setting; the random-shape runs take fp32 or bf16")
    (shapes_main if shapes else cpu_main)(args)


if __name__ == "__main__":
    main()
