"""Data-parallel scaling on a Ray runtime (issue 24): the same global batch trained on 1 worker and on 2 workers.

Two measurements, each printing the ratio 1 worker / 2 workers (above 1: 2 workers are faster) and the largest
LoRA weight difference between the two runs, which should be float noise:

  components  Ray Train TorchTrainer with DDP on a random-weight Llama (components/distributed.py): the time of
              the training steps inside the workers (their start-up excluded)
  studio      the studio's own job path: `Studio(cluster=..., cluster_workers=N)` runs DPO on the studio's model
              (default the embedded SmolLM2-135M) from labelled pairs, 1 worker (one actor) against 2 Ray Train
              workers with gradients averaged before the clip; the sum of the steps' `t_step` (start-up and
              model loading excluded) and the wall time of the whole run (included)

One thread per worker (RLHF_STUDIO_TRAIN_THREADS, default 1 here), so 2 workers use twice the cores of 1.

Run: .venv/bin/python bench/bench_cluster.py [--address local|ray://head:10001] [--part components|studio|both]
     [--steps 10] [--batch 16] [--studio-steps 4] [--studio-batch 8] [--model embedded] [--gpu]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RLHF_STUDIO_TRAIN_THREADS", "1")

PROMPTS = ["Name a fruit.", "Say hello.", "Name a colour.", "Tell a joke.", "Name an animal.", "Count to three.",
           "Name a city.", "Describe rain."]


def components_scaling(args) -> None:
    from rlhf_studio.components.distributed import train_data_parallel
    kw = dict(batch=args.batch, seq_len=args.seq_len, steps=args.steps, hidden=args.hidden, layers=args.layers,
              use_gpu=args.gpu)
    one = train_data_parallel(1, **kw)
    two = train_data_parallel(2, **kw)
    diff = max((one["lora"][k] - two["lora"][k]).abs().max().item() for k in one["lora"])
    print(f"[components] {args.steps} steps, global batch {args.batch} x {args.seq_len} tokens, tiny Llama "
          f"{args.layers}x{args.hidden} with LoRA r=4")
    print(f"  1 worker : {one['seconds']:.2f} s, final loss {one['losses'][-1]:.5f}")
    print(f"  2 workers: {two['seconds']:.2f} s, final loss {two['losses'][-1]:.5f}")
    print(f"  scaling ratio (1 worker / 2 workers): {one['seconds'] / two['seconds']:.2f}x; "
          f"LoRA max |diff| {diff:.2e}")


def _adapter_tensors(s, adapter_id: int, folder: str) -> dict:
    from safetensors.torch import load_file
    from rlhf_studio.components.adapters import unpack_adapter
    path = unpack_adapter(s.store.adapter(adapter_id)["weights"], os.path.join(folder, str(adapter_id)))
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def studio_scaling(args) -> None:
    from rlhf_studio import Studio
    with tempfile.TemporaryDirectory() as d:
        s = Studio(os.path.join(d, "bench.duckdb"), model=args.model, device="cpu", cluster=args.address)
        try:
            for p in PROMPTS:                       # one preference pair per prompt
                a, b = s.generate(p, n=2, max_new_tokens=12, seed=0)
                s.compare(a.id, b.id, winner="a")
            settings = dict(steps=args.studio_steps, batch_size=args.studio_batch, max_completion_tokens=16,
                            lora_r=8, lora_alpha=16, lr=1e-3)
            runs = {}
            for workers in (1, 2):
                s.cluster.workers = workers
                t0 = time.perf_counter()
                run = s.train("dpo", wait=True, **settings)
                if run.status != "completed":
                    raise SystemExit(f"the {workers}-worker run ended {run.status}: {run.error}")
                m = run.metrics()
                runs[workers] = (float(m["t_step"].sum()), time.perf_counter() - t0, float(m["loss"].iloc[-1]),
                                 _adapter_tensors(s, run.adapter_id, d))
        finally:
            s.close()
    a1, a2 = runs[1][3], runs[2][3]
    diff = max((a1[k] - a2[k]).abs().max().item() for k in a1)
    print(f"[studio] DPO, {args.studio_steps} steps, global batch {args.studio_batch} pairs, model {args.model}, "
          f"LoRA r=8")
    for w in (1, 2):
        print(f"  {w} worker{'s' if w > 1 else ' '}: steps {runs[w][0]:.2f} s (whole run with start-up "
              f"{runs[w][1]:.1f} s), final loss {runs[w][2]:.6f}")
    print(f"  scaling ratio (1 worker / 2 workers), steps: {runs[1][0] / runs[2][0]:.2f}x; whole run: "
          f"{runs[1][1] / runs[2][1]:.2f}x; adapter max |diff| {diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", default="local", help="'local' starts Ray here; else a Ray address")
    ap.add_argument("--part", choices=["components", "studio", "both"], default="both")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16, help="global batch (rows), split over the workers")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--studio-steps", type=int, default=4)
    ap.add_argument("--studio-batch", type=int, default=8, help="global DPO batch (pairs), split over the workers")
    ap.add_argument("--model", default="embedded", help="the studio's model for --part studio")
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker (components part)")
    args = ap.parse_args()
    import ray
    ray.init(address=None if args.address == "local" else args.address, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    print(f"cluster: {ray.cluster_resources()}; threads per worker: {os.environ['RLHF_STUDIO_TRAIN_THREADS']}")
    if args.part in ("components", "both"):
        components_scaling(args)
    if args.part in ("studio", "both"):
        studio_scaling(args)
    ray.shutdown()


if __name__ == "__main__":
    main()
