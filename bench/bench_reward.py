"""Reward-model benchmark on HH-RLHF harmless-base (test split file, 2,312 pairs). Prints a table; not a test.

Split: pairs sorted by sha1 of the raw "chosen" dialogue; first 80% train (1,849), rest test (463).
Texts: prompt (chat template) + response + EOS, left-truncated to 256 tokens.

Rows: length baselines; fast tier (linear BT probe) after 50 / 200 random train pairs (mean +- sd over draws)
and after all of them; refit time; feature cost per text; deep tier (LoRA on the top layers + head started from
the probe) after all train pairs, with its CPU time; one incremental deep update (16 new pairs + replay).

One base-model pass computes the fast tier's features and the deep tier's cached trunk states (the hidden states
entering the first adapter layer); both are cached under --cache so reruns only pay for training.

    python bench/bench_reward.py --threads 2 --dtype fp32 2>&1 | tee /tmp/bench_reward.log

On this 2-core CPU: the feature pass takes ~75 min once (cached under --cache), the deep tier ~15 min (the
shipped DeepRewardConfig: LoRA r=16 on the top 4 layers, 2 epochs, scored as 0.6 probe + 0.4 fine-tuned).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_studio.components.models import load_model  # noqa: E402
from rlhf_studio.components.reward.bt import pairwise_accuracy  # noqa: E402
from rlhf_studio.storage.io.preferences import read_hh as parse_hh  # noqa: E402
from rlhf_studio.components.reward.deep import (DeepRewardConfig, DeepRewardTrainer, advance_trunks,  # noqa: E402
                                    extract_features_and_trunks)
from rlhf_studio.components.reward.fast import FastRewardModel  # noqa: E402

DATA = Path(os.environ.get("HH_DATA", "/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz"))


def log(*a):
    print(*a, flush=True)


def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def load_split(limit: int | None):
    pairs = parse_hh(DATA)
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        raw = [json.loads(line)["chosen"] for line in f if line.strip()]
    order = sorted(range(len(pairs)), key=lambda i: hashlib.sha1(raw[i].encode("utf-8")).hexdigest())
    if limit:
        order = order[:limit]
    n_train = int(0.8 * len(order))
    return [pairs[i] for i in order[:n_train]], [pairs[i] for i in order[n_train:]]


def features_and_trunks(lm, train, test, args):
    """Features [N, 2H] and trunk states of all texts: chosen/rejected of train then test pairs."""
    allp = train + test
    prompts = [p["prompt"] for p in allp for _ in (0, 1)]
    comps = [t for p in allp for t in (p["chosen"], p["rejected"])]
    key = hashlib.sha1(json.dumps([lm.revision, str(lm.dtype), args.max_tokens, args.trunk_layer,
                                   len(allp), allp[0]["chosen"][:50]]).encode()).hexdigest()[:12]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    f_feat, f_tr, f_off, f_info = (cache / f"{key}.{x}" for x in ("feat.npy", "trunk.npy", "off.npy", "info.json"))
    if all(p.exists() for p in (f_feat, f_tr, f_off, f_info)):
        feats = np.load(f_feat)
        flat = torch.from_numpy(np.load(f_tr, mmap_mode="r")[:].copy()).view(torch.bfloat16)
        off = np.load(f_off)
        trunks = [flat[off[i]:off[i + 1]] for i in range(len(off) - 1)]
        info = json.loads(f_info.read_text())
        log(f"features and trunks from cache {cache}/{key}.*")
        return prompts, comps, feats, trunks, info
    t0 = time.perf_counter()
    last = [t0]

    def progress(done, total):
        if time.perf_counter() - last[0] > 60 or done == total:
            last[0] = time.perf_counter()
            log(f"  features: {done}/{total} texts, {last[0] - t0:.0f} s")

    feats, trunks = extract_features_and_trunks(lm, prompts, comps, args.trunk_layer, batch_size=args.batch_size,
                                                max_tokens=args.max_tokens, progress=progress)
    secs = time.perf_counter() - t0
    trunks = [t.to(torch.bfloat16) for t in trunks]
    off = np.cumsum([0] + [t.shape[0] for t in trunks])
    np.save(f_feat, feats)
    np.save(f_tr, torch.cat(trunks).view(torch.int16).numpy())
    np.save(f_off, off)
    info = {"seconds": secs, "texts": len(comps), "tokens": int(off[-1]), "threads": torch.get_num_threads(),
            "dtype": str(lm.dtype)}
    f_info.write_text(json.dumps(info))
    return prompts, comps, feats, trunks, info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--trunk-layer", type=int, default=22, help="cached layer input (<= first adapter layer)")
    ap.add_argument("--deep-layers", type=int, default=4, help="LoRA on the last k decoder layers (shipped: 4)")
    ap.add_argument("--probe-weight", type=float, default=None, help="deep tier's probe share (config default)")
    ap.add_argument("--deep-epochs", type=int, default=2, help="passes over the train pairs (shipped: 2)")
    ap.add_argument("--deep-lr", type=float, default=None)
    ap.add_argument("--deep-head-lr", type=float, default=None)
    ap.add_argument("--draws", type=int, default=10, help="random draws for the 50- and 200-pair rows")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N pairs (smoke runs)")
    ap.add_argument("--skip-deep", action="store_true")
    ap.add_argument("--cache", default="/tmp/rlhf_reward_bench")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model("embedded", device=args.device, dtype=args.dtype)
    log(f"model {lm.model_id} {lm.revision} on {lm.device} {lm.dtype}, torch threads {torch.get_num_threads()}")
    train, test = load_split(args.limit or None)
    log(f"HH harmless-base: {len(train)} train / {len(test)} test pairs, max_tokens {args.max_tokens}")
    prompts, comps, feats, trunks, info = features_and_trunks(lm, train, test, args)
    n_tr, n_te = len(train), len(test)
    Xc_tr, Xr_tr = feats[0:2 * n_tr:2], feats[1:2 * n_tr:2]
    Xc_te, Xr_te = feats[2 * n_tr::2], feats[2 * n_tr + 1::2]

    rows = []

    def row(name, acc, err, extra=""):
        rows.append((name, acc, err, extra))
        log(f"  {name:<44} {acc:.3f} ± {err:.3f}  {extra}")

    tok = lm.tokenizer
    lens = [len(ids) for ids in tok([p[k] for p in test for k in ("chosen", "rejected")],
                                    add_special_tokens=False)["input_ids"]]
    lc, lr = np.array(lens[0::2]), np.array(lens[1::2])
    a = pairwise_accuracy(lc, lr)
    row("longer response wins (tokens)", a, se(a, n_te))
    a = pairwise_accuracy(-lc, -lr)
    row("shorter response wins (tokens)", a, se(a, n_te))

    rng = np.random.default_rng(0)
    for k in (50, 200):
        if k >= n_tr:
            continue
        accs = []
        for _ in range(args.draws):
            idx = rng.choice(n_tr, size=k, replace=False)
            m = FastRewardModel().fit(Xc_tr[idx], Xr_tr[idx])
            accs.append(m.evaluate(Xc_te, Xr_te)["accuracy"])
        row(f"fast tier, {k} random train pairs", float(np.mean(accs)), float(np.std(accs)),
            f"(mean ± sd over {args.draws} draws)")
    t0 = time.perf_counter()
    probe = FastRewardModel().fit(Xc_tr, Xr_tr)
    fit_cv = time.perf_counter() - t0
    ev = probe.evaluate(Xc_te, Xr_te)
    row(f"fast tier, all {n_tr} train pairs", ev["accuracy"], se(ev["accuracy"], n_te),
        f"(l2 = {probe.l2:.3g}, c = {probe.l2 / probe.l2_scale:g}, ECE {ev['ece']:.3f})")
    t0 = time.perf_counter()
    FastRewardModel().fit(Xc_tr, Xr_tr, l2=probe.l2)
    fit_fixed = time.perf_counter() - t0
    t0 = time.perf_counter()
    probe.fit(np.vstack([Xc_tr, Xc_te[:1]]), np.vstack([Xr_tr, Xr_te[:1]]))
    refit_warm = time.perf_counter() - t0
    probe = FastRewardModel().fit(Xc_tr, Xr_tr)
    timings = {
        "refit, all train pairs, l2 by CV (s)": fit_cv,
        "refit, all train pairs, fixed l2 (s)": fit_fixed,
        "refit after one more label, warm start + CV (s)": refit_warm,
        "features: base pass per text (s)": info["seconds"] / info["texts"],
        "features: base pass tokens per second": info["tokens"] / info["seconds"],
    }
    for k, v in timings.items():
        log(f"  {k:<50} {v:.3f}")

    deep_info = {}
    if not args.skip_deep:
        # trunk_layer stays None: the model starts its passes at the first adapter layer (the cached trunks are
        # advanced there once below), not at the lower cached layer, which would rerun the layers in between
        # on every pass
        cfg = DeepRewardConfig(lora_layers=args.deep_layers, epochs=args.deep_epochs, max_tokens=args.max_tokens,
                               trunk_cache_mb=1 << 16, micro_batch_size=4)
        if args.deep_lr:
            cfg.lr = args.deep_lr
        if args.deep_head_lr:
            cfg.head_lr = args.deep_head_lr
        if args.probe_weight is not None:
            cfg.probe_weight = args.probe_weight
        trainer = DeepRewardTrainer(lm, cfg, adapter_name="reward", probe=probe)
        t0, c0 = time.perf_counter(), time.process_time()
        split = trainer.model.split
        if split != args.trunk_layer:     # run the layers between the cached layer and the adapter once
            trunks = advance_trunks(lm, trunks, args.trunk_layer, split, batch_size=args.batch_size)
        advance_wall = time.perf_counter() - t0
        log(f"  trunks advanced from layer {args.trunk_layer} to {split}: {advance_wall:.0f} s")
        trainer.model.put_trunks(prompts, comps, trunks)
        te_prompts = [p["prompt"] for p in test for _ in (0, 1)]
        te_comps = [t for p in test for t in (p["chosen"], p["rejected"])]
        log("  deep tier: training starts (its score equals the probe's until then)")
        pairs = [(p["prompt"], p["chosen"], p["rejected"], None) for p in train]
        t0, c0 = time.perf_counter(), time.process_time()
        last = [t0]

        def progress(step, total):
            if time.perf_counter() - last[0] > 120 or step == total:
                last[0] = time.perf_counter()
                log(f"  deep: step {step}/{total}, {last[0] - t0:.0f} s")

        metrics = trainer.train(pairs, [], progress=progress)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        t1 = time.perf_counter()
        # The fine-tuned part from the cached trunks; the probe part of the ensemble is the probe on the
        # features computed above (what score() would recompute from the same trunks).
        pw = trainer.model.probe_weight
        trainer.model.config.probe_weight = 0.0
        s_only = trainer.score(te_prompts, te_comps)
        trainer.model.config.probe_weight = pw
        s_probe, _ = probe.score(feats[2 * n_tr:])
        s1 = (1 - pw) * s_only + pw * s_probe
        score_s = time.perf_counter() - t1
        a1 = pairwise_accuracy(s1[0::2], s1[1::2])
        a_only = pairwise_accuracy(s_only[0::2], s_only[1::2])
        row(f"deep tier alone (adapter + head), all {n_tr} train pairs", a_only, se(a_only, n_te))
        row(f"deep tier, all {n_tr} train pairs", a1, se(a1, n_te),
            f"(top {args.deep_layers} layers LoRA r={cfg.lora_r}, {cfg.epochs} epochs, train loss "
            f"{metrics['loss']:.3f}, probe weight {pw})")
        # paired comparison with the probe on the same test pairs
        ps, _ = probe.score(feats[2 * n_tr:])
        pc = (ps[0::2] > ps[1::2]).astype(float) + 0.5 * (ps[0::2] == ps[1::2])
        dc = (s1[0::2] > s1[1::2]).astype(float) + 0.5 * (s1[0::2] == s1[1::2])
        diff = dc - pc
        log(f"  deep - fast on the same test pairs: {diff.mean():+.3f} ± {diff.std() / math.sqrt(len(diff)):.3f}")
        deep_info = {"deep: advance cached trunks to the adapter layer (s)": advance_wall,
                     "deep train wall (s)": wall, "deep train CPU (s, process time)": cpu,
                     f"deep test scoring (fine-tuned part), {2 * n_te} texts from cached trunks (s)": score_s}
        # One incremental update as the app does it: 16 new pairs + 16 replay pairs, nothing cached.
        trainer.model._trunks.clear()
        trainer.model._trunk_bytes = 0
        inc_cfg = DeepRewardConfig(**{**cfg.__dict__, "epochs": 1})
        trainer.config = inc_cfg
        new = [(p["prompt"], p["chosen"], p["rejected"], None) for p in test[:16]]
        t0 = time.perf_counter()
        m2 = trainer.train(new, pairs, progress=None)
        deep_info["incremental update: 16 new + 16 replay pairs, no cache (s)"] = time.perf_counter() - t0
        deep_info["incremental update steps"] = m2["steps"]
        for k, v in deep_info.items():
            log(f"  {k:<50} {v:.1f}")

    log("")
    log(f"| HH harmless-base, {n_te} held-out pairs | accuracy | ± |")
    log("|---|---|---|")
    for name, acc, err, extra in rows:
        log(f"| {name} {extra} | {acc:.3f} | {err:.3f} |")
    for k, v in {**timings, **deep_info}.items():
        log(f"| {k} | {v:.3f} | |")
    log(f"(device {lm.device}, dtype {lm.dtype}, torch threads {torch.get_num_threads()}, features pass "
        f"{info['seconds']:.0f} s for {info['texts']} texts with {info['threads']} threads)")


if __name__ == "__main__":
    main()
