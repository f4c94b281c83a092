"""Label latency under load, without and with the deep reward tier training in the background.

    python bench/bench_load.py                       # 4 sessions, 45 s per phase
    python bench/bench_load.py --sessions 4 --seconds 60 --json artifacts/bench_load.json

One process: seeds a DuckDB file (16 prompts x 4 fixed completions, star ratings), starts the real app
(`python launch.py`, embedded SmolLM2-135M, one compute thread as in the test suite), opens headless Chromium
with N labelling sessions and one observer page on the Reward tab, then runs two phases against the same app:
  1. no training  (the observer sets "deep update every K new pairs" to 0 and waits for any update to end)
  2. training     (the observer presses "Train deep tier now"; automatic updates every 16 new pairs keep it busy)
and prints median / p99 label latency (click -> confirming status line, measured in the page) of each phase and
the ratio. Every confirmed label is checked against the file afterwards.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.browser import running_app  # noqa: E402
from tests.faults.helpers import QUIET_THREADS  # noqa: E402
from tests.faults.load_sessions import (check_db, run_label_load, seed_database, stop_gracefully, summary,  # noqa: E402
                                        write_json)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=45, help="labelling time per phase")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--db", default=None, help="database file (default: a temporary one)")
    ap.add_argument("--json", default="artifacts/bench_load.json")
    args = ap.parse_args(argv)

    os.environ.update(QUIET_THREADS)
    import torch
    torch.set_num_threads(1)
    from rlhf_studio.components.models import load_model

    tmp = tempfile.mkdtemp(prefix="bench-load-")
    db = args.db or os.path.join(tmp, "load.duckdb")
    t0 = time.perf_counter()
    info = seed_database(db, load_model("embedded"), n_prompts=args.prompts)
    print(f"seeded {len(info['prompts'])} prompts in {time.perf_counter() - t0:.0f} s", flush=True)
    with running_app(db) as (url, proc):
        res = run_label_load(url, info["prompts"], n_sessions=args.sessions,
                             phases=((False, args.seconds), (True, args.seconds)))
        rc = stop_gracefully(proc)
    out = {"sessions": args.sessions, "seconds_per_phase": args.seconds, "app_exit_code": rc, "phases": {}}
    all_sessions = []
    for ph in res["phases"]:
        name = "training" if ph["train"] else "idle"
        st = summary(ph["sessions"])
        share = sum(1 for _, on in ph["samples"] if on) / max(len(ph["samples"]), 1)
        problems = [p for s in ph["sessions"] for p in s.problems] + [t for s in ph["sessions"] for t in s.toasts]
        out["phases"][name] = {**st, "deep_training_share": share, "problems": problems}
        all_sessions += ph["sessions"]
        print(f"{name:9s}: {st['labels']:4d} labels {st['per_session']}, median {st['median_ms']:.0f} ms, "
              f"p90 {st['p90_ms']:.0f} ms, p99 {st['p99_ms']:.0f} ms, max {st['max_ms']:.0f} ms; "
              f"deep training in {share:.0%} of samples; problems: {len(problems)}", flush=True)
    db_problems = check_db(db, info["prompts"], info["last_label_id"], all_sessions)
    out["db_problems"] = db_problems
    idle, busy = out["phases"].get("idle"), out["phases"].get("training")
    if idle and busy and idle["p99_ms"] and busy["p99_ms"]:
        out["p99_ratio_training_over_idle"] = busy["p99_ms"] / idle["p99_ms"]
        out["median_ratio_training_over_idle"] = busy["median_ms"] / idle["median_ms"]
        print(f"p99 ratio (training / idle): {out['p99_ratio_training_over_idle']:.2f}; "
              f"median ratio: {out['median_ratio_training_over_idle']:.2f}")
    print(f"database check: {'ok' if not db_problems else db_problems}")
    if args.json:
        write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0 if not db_problems else 1


if __name__ == "__main__":
    sys.exit(main())
