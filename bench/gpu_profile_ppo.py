"""Where a PPO step's time goes: torch.profiler over one step of the trainer, after warm-up steps.

The 1.7B shape's training phase ran at 26.7% of an H100's bf16 peak compiled, 18.9% eager (docs/GPU.md), where
the issue asks for 35%; this prints the operators that take the time, so the next change to the training pass is
aimed, not guessed. Same random-weight models, prompts and synthetic reward
as bench/gpu_ppo.py.

    python bench/gpu_profile_ppo.py --shape 1.7b                 # on a GPU (~1 min); --compile on to compare
    python bench/gpu_profile_ppo.py --device cpu --shape tiny    # CPU check of the script
Profiles the training phase (the PPO update) of the step after the warm-up: prints its top operators by self
device time (self CPU time on a CPU), how busy the GPU was, and the step's phases; writes a gzipped Chrome trace
to $OUT/ppo_profile_<shape>_compile_<on|off>.json.gz when $OUT is set.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.gpu_ppo import random_trainer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="1.7b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mini-batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", choices=["off", "on"], default="off")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--logit-std", type=float, default=3.0)
    args = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    trainer, _ = random_trainer(args.shape, device, dtype, args.batch, args.logit_std, steps=args.warmup + 1,
                                batch_size=args.batch, mini_batch_size=args.mini_batch, ppo_epochs=args.epochs,
                                max_new_tokens=args.new_tokens, max_prompt_tokens=64, temperature=1.0, lr=1e-5,
                                kl_coef=0.01, missing_eos_penalty=0.0, seed=0, value_head_init="zeros",
                                compile=args.compile)
    for i in range(args.warmup):
        m = trainer.step()
        print(f"warm-up step {i + 1}: {m['t_step']:.2f} s", flush=True)

    # the training phase alone (the PPO update), where the MFU goal lies; the step's phases from its metrics
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiled, optimise = {}, trainer._optimise

    def profiled_optimise(*a, **k):
        with profile(activities=activities, record_shapes=False) as prof:
            t0 = time.perf_counter()
            out = optimise(*a, **k)
            if device.type == "cuda":
                torch.cuda.synchronize()
            profiled["wall_s"] = time.perf_counter() - t0
        profiled["prof"] = prof
        return out
    trainer._optimise = profiled_optimise
    m = trainer.step()
    prof = profiled["prof"]
    phases = {k: round(m[k], 3) for k in ("t_generate", "t_policy", "t_reference", "t_score", "t_train", "t_step")}
    print(f"\nprofiled training phase ({args.shape}, batch {args.batch}, mini-batch {args.mini_batch}, "
          f"{args.epochs} epochs, compile {args.compile}); the step's phases: {phases}\n")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=60))
    if device.type == "cuda":
        # kernels' own time against the phase's wall time: far below 100% means the host (Python, launches,
        # syncs) keeps the GPU waiting, not the kernels
        busy = sum(e.self_device_time_total for e in prof.key_averages()
                   if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
        print(f"GPU kernel time {busy:.3f} s in a training phase of {profiled['wall_s']:.3f} s wall "
              f"({100 * busy / profiled['wall_s']:.0f}% busy, profiler overhead included)")
    if os.environ.get("OUT"):
        raw = Path(tempfile.mkdtemp()) / "trace.json"
        prof.export_chrome_trace(str(raw))
        dest = Path(os.environ["OUT"]) / f"ppo_profile_{args.shape}_compile_{args.compile}.json.gz"
        with open(raw, "rb") as f, gzip.open(dest, "wb") as g:
            shutil.copyfileobj(f, g)
        print(f"wrote {dest}")

if __name__ == "__main__":
    main()
