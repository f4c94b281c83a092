"""Foundation benchmark (issue 2). Prints ratios measured in one run:

1. cold start (GGUF dequantised, fresh cache) vs warm start (cached safetensors): time to app ready;
2. generation tokens/s: n=4 in one batched call vs four sequential n=1 calls;
3. label write latency (median, p99) on a file-backed DuckDB, acknowledged only after COMMIT.

Run: .venv/bin/python bench/bench_foundation.py [--labels 300]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def time_to_ready(cache: str, db: str) -> float:
    """Seconds from process start until the app serves (the CLI prints its URL)."""
    from tests.browser import free_port
    env = dict(os.environ, RLHF_STUDIO_CACHE=cache, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--db", db, "--port", str(free_port()),
                             "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in proc.stdout:
            if "RLHF Studio running at" in line:
                return time.perf_counter() - t0
        raise RuntimeError("app did not start")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--labels", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-foundation-")

    # 1. cold vs warm start
    cache = os.path.join(tmp, "cache")
    cold = time_to_ready(cache, os.path.join(tmp, "a.duckdb"))
    warm = time_to_ready(cache, os.path.join(tmp, "b.duckdb"))

    # 2. batched vs sequential generation
    from rlhf_studio.components.generation import SamplingParams, generate
    from rlhf_studio.components.models import load_model
    lm = load_model("embedded")
    prompt = "Write a short story about a lighthouse keeper."
    generate(lm, prompt, SamplingParams(n=4, max_new_tokens=8, seed=0))            # warm-up
    t0 = time.perf_counter()
    batched = generate(lm, prompt, SamplingParams(n=4, max_new_tokens=args.tokens, temperature=1.0, seed=1))
    t_batched = time.perf_counter() - t0
    tok_batched = sum(g.completion_tokens for g in batched)
    t0 = time.perf_counter()
    seq = [generate(lm, prompt, SamplingParams(n=1, max_new_tokens=args.tokens, temperature=1.0, seed=10 + i))[0]
           for i in range(4)]
    t_seq = time.perf_counter() - t0
    tok_seq = sum(g.completion_tokens for g in seq)

    # 3. label write latency through the Studio API (file-backed, verified COMMIT)
    from rlhf_studio import Studio
    s = Studio(os.path.join(tmp, "labels.duckdb"), model=lm)
    s.reward.settings.deep_every = 0
    pid = s.store.add_prompt("bench prompt")
    ids = s.store.add_completions([dict(prompt_id=pid, text=f"completion {i}", source="model") for i in range(8)])
    lat = []
    for i in range(args.labels):
        t0 = time.perf_counter()
        s.store.add_feedback(kind="stars", completion_id=ids[i % 8], stars=1 + i % 5, annotator="bench")
        lat.append((time.perf_counter() - t0) * 1000)
    lat_api = []
    for i in range(min(args.labels, 100)):      # the full path: write + fast-tier refit
        t0 = time.perf_counter()
        s.rate(ids[i % 8], 1 + (i * 3) % 5)
        lat_api.append((time.perf_counter() - t0) * 1000)
    s.close()

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    print("\n== RLHF Studio foundation benchmark ==")
    print(f"machine: {os.cpu_count()} CPUs, model dtype {lm.dtype}")
    print(f"start to app ready   cold {cold:6.1f} s   warm {warm:6.1f} s   cold/warm = {cold / warm:.1f}x")
    print(f"generation tokens/s  batched n=4 {tok_batched / t_batched:7.1f}   sequential 4x1 {tok_seq / t_seq:7.1f}"
          f"   batched/sequential = {(tok_batched / t_batched) / (tok_seq / t_seq):.2f}x")
    print(f"label write (store)  median {statistics.median(lat):6.1f} ms   p99 {pct(lat, 0.99):6.1f} ms"
          f"   ({len(lat)} labels, file-backed, verified COMMIT)")
    print(f"label via s.rate()   median {statistics.median(lat_api):6.1f} ms   p99 {pct(lat_api, 0.99):6.1f} ms"
          f"   (write + fast-tier refit)")


if __name__ == "__main__":
    main()
