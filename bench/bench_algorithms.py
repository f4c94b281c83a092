"""Every algorithm from the same labels and reward, side by side in one run, each against TRL's trainer of the
same name on the same shapes.

Labels: a stand-in preference ("shorter answers are better", as in scripts/screenshots.py): two completions a
prompt sampled from the base, each cut to its first half and that half chosen over the whole (DPO pairs; KTO:
chosen = good, rejected = bad). Reward of
the online algorithms: the same preference as a reward model would learn it, -0.01 per response character. All runs:
the embedded SmolLM2-135M-Instruct in fp32, LoRA r=16 / alpha=32 on all linear layers, the reference = the base
with the adapter off, AdamW, one optimiser step a step.

Speed: samples (DPO: pairs; online: completions) per second of wall-clock time, the median over `--steps` steps
after `--warmup`; beside it the CPU seconds a step takes (time.process_time around each of our steps, and in a
callback around each of TRL's), which a shared machine's changing load does not inflate the way it does the wall
clock. The ratios are ours over TRL's samples per second, by wall clock and by CPU time. `--repeat N` runs ours and
TRL N times per algorithm, alternating which goes first, and reports the median of the N ratios (and of each
side's figures), so that a change of load during the run cannot favour one side.
Movement: after the run, one sampled completion per held-out prompt from the trained policy and from the base:
the mean reward gained over the base, and the KL to the base (sum over the completion of log pi - log pi_ref)
on the policy's samples. TRL's rows get the same evaluation of the adapter TRL trained. With `--repeat`, the
first repeat's runs are evaluated (the later ones repeat the same training, for the timings). PPO has no TRL 1.16
trainer (TRL 1.13 removed it): bench/bench_ppo.py compares ours with TRL 1.12's.

    python bench/bench_algorithms.py                         # everything, small shapes
    python bench/bench_algorithms.py --only dpo,grpo --skip-trl
    python bench/bench_algorithms.py --only dpo,kto --repeat 3 --json out.json
Needs trl==1.16.0 for the TRL rows (pip install trl==1.16.0; the app does not use it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN_PROMPTS = ["Give me one tip for writing a clear email.", "Explain photosynthesis to a child.",
                 "Write a haiku about autumn.", "What is a good name for a cat?", "How do I boil an egg?",
                 "Why is the sky blue?", "Suggest a weekend hobby.", "Describe the smell of rain."]
HELDOUT_PROMPTS = ["How can I sleep better?", "Tell me a fun fact about octopuses.",
                   "What should I cook tonight?", "Explain recursion briefly."]
CHAR_PENALTY = 0.01


class ShorterIsBetter:
    """The reward: -CHAR_PENALTY per character of the response (a RewardFn, components/training/rewards.py). By
    characters, not tokens, so that completions cut at the same token limit still score differently."""
    uses_base_hidden = False

    def __init__(self, tokenizer):
        import torch
        vocab = len(tokenizer)
        self.chars = torch.tensor([len(tokenizer.decode([i], skip_special_tokens=True)) for i in range(vocab)],
                                  dtype=torch.float32)

    def __call__(self, *, model, input_ids, attention_mask, response_mask, base_hidden=None):
        chars = self.chars.to(input_ids.device)[input_ids.clamp(max=len(self.chars) - 1)]
        return -CHAR_PENALTY * (chars * response_mask).sum(1)


def load():
    from rlhf_studio.components.models import load_model
    return load_model("embedded", dtype="fp32")


def make_labels(args) -> tuple[list[dict], list[dict]]:
    """Two sampled completions a train prompt (up to twice the run's new tokens); each gives a pair: its first
    half (ended there: shorter) chosen over the whole. -> (pairs, unpaired rows: chosen good, rejected bad)."""
    import torch
    from rlhf_studio.components.training.engine.rollout import encode_prompts, left_pad, mask_after_eos, sample
    lm = load()
    torch.manual_seed(0)
    prompts = [p for p in TRAIN_PROMPTS for _ in range(2)]
    with torch.no_grad():
        q, qm = left_pad(encode_prompts(lm, prompts, 128), lm.pad_token_id, lm.device)
        resp = sample(lm.model, q, qm, 2 * args.new_tokens, 1.0, 1.0, lm.eos_token_id, lm.pad_token_id)
        mask, _ = mask_after_eos(resp, lm.eos_token_id)
    pairs = []
    for i, p in enumerate(prompts):
        ids = [t for t in resp[i, :int(mask[i].sum())].tolist() if t != lm.eos_token_id]
        short = lm.tokenizer.decode(ids[:len(ids) // 2], skip_special_tokens=True).strip()
        full = lm.tokenizer.decode(ids, skip_special_tokens=True).strip()
        if short and full and short != full:
            pairs.append({"prompt": p, "chosen": short, "rejected": full})
    unpaired = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                for p in pairs for k in ("chosen", "rejected")]
    return pairs, unpaired


def evaluate(lm, model, args) -> dict:
    """Mean reward gained over the base and the KL to the base on held-out prompts (one sample each, seeded)."""
    import torch
    from rlhf_studio.components.training.engine.rollout import (encode_prompts, forward_response, left_pad,
                                                                mask_after_eos, sample)
    model.eval()
    q, qm = left_pad(encode_prompts(lm, HELDOUT_PROMPTS * args.eval_samples, 128), lm.pad_token_id, lm.device)
    out = {}
    with torch.no_grad():
        for who in ("policy", "base"):
            torch.manual_seed(1)
            with (model.disable_adapter() if who == "base" else nullcontext()):
                resp = sample(model, q, qm, args.new_tokens, 0.7, 1.0, lm.eos_token_id, lm.pad_token_id)
            mask, _ = mask_after_eos(resp, lm.eos_token_id)
            resp = torch.where(mask.bool(), resp, torch.full_like(resp, lm.pad_token_id))
            texts = [lm.tokenizer.decode(resp[i, :int(mask[i].sum())].tolist(), skip_special_tokens=True)
                     for i in range(resp.shape[0])]
            out[who] = -CHAR_PENALTY * sum(map(len, texts)) / len(texts)
            if who == "policy":
                logp = forward_response(model, q, qm, resp, mask, 1.0).logp
                with model.disable_adapter():
                    ref = forward_response(model, q, qm, resp, mask, 1.0).logp
                out["kl"] = float(((logp - ref) * mask).sum(1).mean())
    return {"reward_gain": round(out["policy"] - out["base"], 3), "kl": round(out["kl"], 3)}


def speed(per_step: int, times: list[float], cpu: list[float], args) -> dict:
    """Samples per second (wall clock) and CPU seconds a step: medians over the steps after the warmup."""
    wall, cpu_s = statistics.median(times[args.warmup:]), statistics.median(cpu[args.warmup:])
    return {"samples_per_s": round(per_step / wall, 3), "median_step_s": round(wall, 2),
            "cpu_s_per_step": round(cpu_s, 3)}


# --------------------------------------------------------------------------------------------------- ours
def run_ours(algorithm: str, args, pairs, unpaired, movement: bool = True) -> dict:
    import torch
    from rlhf_studio.components.training import build_trainer, config_class
    lm = load()
    n_steps = args.steps + args.warmup
    common = dict(steps=n_steps, lr=args.lr, lora_r=16, lora_alpha=32, seed=0, **dict(args.set))
    if algorithm in ("dpo", "kto"):
        cfg = config_class(algorithm)(batch_size=args.batch, max_completion_tokens=2 * args.new_tokens + 1,
                                      beta=0.1, **common)
        tr = build_trainer(lm, algorithm, cfg, rows=pairs if algorithm == "dpo" else unpaired)
        per_step = args.batch
    else:
        extra = dict(mini_batch_size=args.prompts * args.k) if algorithm != "ppo" else {}
        if algorithm == "ppo":
            cfg = config_class("ppo")(batch_size=args.prompts * args.k, mini_batch_size=args.prompts * args.k,
                                      ppo_epochs=1, max_new_tokens=args.new_tokens, temperature=1.0, **common)
        else:
            cfg = config_class(algorithm)(prompts_per_step=args.prompts, k=args.k, max_new_tokens=args.new_tokens,
                                          temperature=1.0, kl_coef=0.05, **extra, **common)
        tr = build_trainer(lm, algorithm, cfg, prompts=TRAIN_PROMPTS, reward_fn=ShorterIsBetter(lm.tokenizer))
        per_step = args.prompts * args.k
    torch.manual_seed(0)
    times, cpu = [], []
    for _ in range(n_steps):
        c0 = time.process_time()
        times.append(tr.step()["t_step"])
        cpu.append(time.process_time() - c0)
    return {**speed(per_step, times, cpu, args), **(evaluate(lm, tr.model, args) if movement else {})}


# ---------------------------------------------------------------------------------------------------- TRL
def run_trl(algorithm: str, args, pairs, unpaired, movement: bool = True) -> dict:
    import tempfile
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    import trl
    lm = load()
    tok = lm.tokenizer
    tok.padding_side = "left"
    n_steps = args.steps + args.warmup
    times: list[float] = []
    cpu: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.c)

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    user = lambda p: [{"role": "user", "content": p}]           # noqa: E731 - chat template on both sides
    assistant = lambda c: [{"role": "assistant", "content": c}]  # noqa: E731
    with tempfile.TemporaryDirectory() as out:
        common = dict(output_dir=out, max_steps=n_steps, learning_rate=args.lr, report_to="none", logging_steps=1,
                      save_strategy="no", use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0,
                      gradient_accumulation_steps=1)
        if algorithm in ("dpo", "kto"):
            if algorithm == "dpo":
                data = Dataset.from_list([{"prompt": user(p["prompt"]), "chosen": assistant(p["chosen"]),
                                           "rejected": assistant(p["rejected"])} for p in pairs])
                conf = trl.DPOConfig(per_device_train_batch_size=args.batch, beta=0.1, max_length=256, **common)
                trainer = trl.DPOTrainer(model=lm.model, args=conf, train_dataset=data, processing_class=tok,
                                         peft_config=lora, callbacks=[Clock()])
            else:
                data = Dataset.from_list([{"prompt": user(r["prompt"]), "completion": assistant(r["completion"]),
                                           "label": r["label"]} for r in unpaired])
                conf = trl.KTOConfig(per_device_train_batch_size=args.batch, beta=0.1, max_length=256, **common)
                trainer = trl.KTOTrainer(model=lm.model, args=conf, train_dataset=data, processing_class=tok,
                                         peft_config=lora, callbacks=[Clock()])
            per_step = args.batch
        else:
            def shorter_is_better(completions, completion_ids=None, **_):
                return [-CHAR_PENALTY * len(tok.decode(ids, skip_special_tokens=True)) for ids in completion_ids]
            data = Dataset.from_list([{"prompt": user(p)} for p in TRAIN_PROMPTS])
            n = args.prompts * args.k
            shared = dict(per_device_train_batch_size=n, num_generations=args.k, max_completion_length=args.new_tokens,
                          temperature=1.0, num_iterations=1, **common)
            if algorithm == "grpo":
                conf = trl.GRPOConfig(beta=0.04, loss_type="grpo", **shared)
                cls = trl.GRPOTrainer
            else:
                conf = trl.RLOOConfig(beta=0.05, **shared)
                cls = trl.RLOOTrainer
            trainer = cls(model=lm.model, reward_funcs=shorter_is_better, args=conf, train_dataset=data,
                          processing_class=tok, peft_config=lora, callbacks=[Clock()])
            per_step = n
        trainer.train()
    lm.model = trainer.model
    lm.tokenizer.padding_side = "left"
    return {**speed(per_step, times, cpu, args), **(evaluate(lm, trainer.model, args) if movement else {})}


def compare(alg: str, args, pairs, unpaired) -> dict:
    """Ours and TRL's trainer of the same name, `--repeat` times, alternating which runs first; each side's
    figures and the ratios are medians over the repeats (the movement: the first repeat's)."""
    with_trl = not args.skip_trl and alg != "ppo"
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for i in range(args.repeat):
        sides = ["ours", "trl"] if with_trl else ["ours"]
        for side in sides if i % 2 == 0 else sides[::-1]:
            r = (run_ours if side == "ours" else run_trl)(alg, args, pairs, unpaired, movement=i == 0)
            runs[side].append(r)
            print(f"[bench] {'ours' if side == 'ours' else 'TRL'} {alg} ({i + 1}/{args.repeat}): {r}", flush=True)
    out = {f"{side}_{alg}": median_run(rs) for side, rs in runs.items() if rs}
    wall = [o["samples_per_s"] / t["samples_per_s"] for o, t in zip(runs["ours"], runs["trl"])]
    cpu = [t["cpu_s_per_step"] / o["cpu_s_per_step"] for o, t in zip(runs["ours"], runs["trl"])]
    out[f"ratio_{alg}"] = f"{statistics.median(wall):.2f}x" if wall else "—"
    out[f"cpu_ratio_{alg}"] = f"{statistics.median(cpu):.2f}x" if cpu else "—"
    if wall:
        out[f"ratios_{alg}"] = {"wall": [round(x, 3) for x in wall], "cpu": [round(x, 3) for x in cpu]}
    return out


def median_run(runs: list[dict]) -> dict:
    """The first run's figures with each speed figure replaced by its median over the runs."""
    out = dict(runs[0])
    for k in ("samples_per_s", "median_step_s", "cpu_s_per_step"):
        out[k] = round(statistics.median(r[k] for r in runs), 3)
    if len(runs) > 1:
        out["repeats"] = [{k: r[k] for k in ("samples_per_s", "cpu_s_per_step")} for r in runs]
    return out


def setting(text: str) -> tuple[str, object]:
    """KEY=VALUE -> (key, value), the value read as JSON where it parses (numbers, true/false), else text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="ppo,rloo,grpo,dpo,kto")
    ap.add_argument("--steps", type=int, default=3, help="measured steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4, help="DPO pairs / KTO rows a step")
    ap.add_argument("--prompts", type=int, default=2, help="online: prompts a step")
    ap.add_argument("--k", type=int, default=4, help="online: completions a prompt")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--set", action="append", default=[], type=setting, metavar="KEY=VALUE",
                    help="a setting of our trainers' configs, e.g. --set tree_rows=false (repeatable)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of ours and TRL per algorithm, alternating which goes first; medians reported")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(args.threads)
    pairs, unpaired = make_labels(args)
    print(f"[bench] {len(pairs)} pairs, {len(unpaired)} unpaired rows", flush=True)
    results = {}
    for alg in args.only.split(","):
        results.update(compare(alg, args, pairs, unpaired))
    print(f"\n{len(pairs)} pairs; DPO/KTO {args.batch} rows a step; online {args.prompts} prompts x k={args.k}, "
          f"{args.new_tokens} new tokens; medians of {args.steps} steps after {args.warmup}"
          f"{f', and of {args.repeat} alternating repeats' if args.repeat > 1 else ''}; {args.threads} "
          f"thread(s), {os.cpu_count()} CPUs\n")
    print("| algorithm | ours samples/s | TRL 1.16 samples/s | ratio | ours CPU s/step | TRL CPU s/step | "
          "ratio by CPU time | ours reward gain / KL | TRL reward gain / KL |")
    print("|---|---|---|---|---|---|---|---|---|")
    for alg in args.only.split(","):
        o, t = results[f"ours_{alg}"], results.get(f"trl_{alg}")
        theirs = f"{t['reward_gain']:+.2f} / {t['kl']:.2f}" if t else "—"
        print(f"| {alg.upper()} | {o['samples_per_s']:.3f} | {t['samples_per_s'] if t else '—'} | "
              f"{results[f'ratio_{alg}']} | {o['cpu_s_per_step']:.3f} | {t['cpu_s_per_step'] if t else '—'} | "
              f"{results[f'cpu_ratio_{alg}']} | {o['reward_gain']:+.2f} / {o['kl']:.2f} | {theirs} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
