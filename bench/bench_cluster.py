"""Data-parallel scaling on a Ray runtime (issue 24): the same global batch trained on 1 worker and on 2 workers
(Ray Train TorchTrainer, DDP; gloo on CPU, nccl with --gpu). Prints the time of the training steps inside the
workers (start-up of the workers excluded) and the ratio 1 worker / 2 workers (above 1: 2 workers are faster),
and the largest LoRA weight difference between the two, which should be float noise.

Run: .venv/bin/python bench/bench_cluster.py [--address local|ray://head:10001] [--steps 10] [--batch 16]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", default="local", help="'local' starts Ray here; else a Ray address")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16, help="global batch (rows), split over the workers")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker")
    args = ap.parse_args()
    import ray
    from components.distributed import train_data_parallel
    ray.init(address=None if args.address == "local" else args.address, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    print(f"cluster: {ray.cluster_resources()}; threads per worker: "
          f"{os.environ.get('RLHF_STUDIO_TRAIN_THREADS') or 1}")
    kw = dict(batch=args.batch, seq_len=args.seq_len, steps=args.steps, hidden=args.hidden, layers=args.layers,
              use_gpu=args.gpu)
    one = train_data_parallel(1, **kw)
    two = train_data_parallel(2, **kw)
    diff = max((one["lora"][k] - two["lora"][k]).abs().max().item() for k in one["lora"])
    print(f"{args.steps} steps, global batch {args.batch} x {args.seq_len} tokens, tiny Llama "
          f"{args.layers}x{args.hidden} with LoRA r=4")
    print(f"1 worker : {one['seconds']:.2f} s, final loss {one['losses'][-1]:.5f}")
    print(f"2 workers: {two['seconds']:.2f} s, final loss {two['losses'][-1]:.5f}")
    print(f"scaling ratio (1 worker / 2 workers): {one['seconds'] / two['seconds']:.2f}x; "
          f"LoRA max |diff| {diff:.2e}")
    ray.shutdown()


if __name__ == "__main__":
    main()
