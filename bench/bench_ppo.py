"""PPO speed on this CPU: our trainer vs TRL 1.12.0's PPO trainer, side by side in one run.

Settings (TRL's harness in /work/shared/peers, or shared/peers in a checkout): the embedded SmolLM2-135M-Instruct,
8 prompts per step, 32 new tokens, 4 PPO epochs, 1 minibatch, LoRA r=16 / alpha=32 on all linear layers,
temperature 0.7, missing-EOS penalty 1.0. TRL runs as a subprocess in its own virtualenv (.venv-trl, see
the harness README); ours runs in this process. Medians over `--steps` steps after `--warmup` steps.

Reward: TRL scores with a second copy of the backbone + scalar head (a full forward) and trains a full value
model. Ours scores with a linear head on pooled base features that the reference pass already computed
(uses_base_hidden) and reads values from a head on the policy trunk: those are the levers being measured.

    python bench/bench_ppo.py                      # fp32, both trainers
    python bench/bench_ppo.py --dtype both         # fp32 and bf16 (TRL bf16 = its bf16=True autocast)
    python bench/bench_ppo.py --skip-trl           # ours only
Prints a table and the ratio of samples/s; --json writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["Give me one tip for writing a clear email.", "Explain photosynthesis to a child.",
           "Write a haiku about autumn.", "What is a good name for a cat?", "How do I boil an egg?",
           "Summarise the plot of Hamlet in one sentence.", "Why is the sky blue?", "Suggest a weekend hobby.",
           "What is the capital of Australia?", "Describe the smell of rain.", "How can I sleep better?",
           "Tell me a fun fact about octopuses.", "What should I cook tonight?", "Explain recursion briefly.",
           "Give a motivational quote.", "How do plants drink water?"]


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
    import torch
    from components.models import load_model
    from components.ppo import LinearHeadReward, PPOConfig, PPOTrainer
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="measured steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="fp32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--merge", choices=["auto", "on", "off"], default="auto",
                    help="our merge_for_generation setting")
    ap.add_argument("--old-logprobs", choices=["auto", "forward", "generation"], default="auto",
                    help="our old_logprobs setting (auto: from generation for fp32, one forward for bf16)")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--plain", action="store_true",
                    help="also run ours with the shared prompt prefix, the fused LoRA forward and packed rows off")
    ap.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    ap.add_argument("--trl-timeout", type=int, default=1800)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()
