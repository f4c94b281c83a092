"""Checkpoints of runs stored before the engine/algorithm split (tests/test_stored_runs.py resumes them).

The blobs in tests/fixtures/stored_runs/ were written by the code of commit 1301dc8 (before the split) with
`python tests/stored_runs.py` (its imports then named components.ppo; do not rewrite them with later code: they
stand for what users' databases hold). Each `<algorithm>.safetensors` is a `state_bytes()` checkpoint taken
after one step, and `<algorithm>.next.safetensors` holds what the next step made of it there (the adapter's
tensors, and the step's metrics in the metadata), so a resumed run can be compared with the one that was not
interrupted.
The model is a tiny random-weight Llama (tests/tiny_models.py, seed 0) with the embedded tokenizer.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "stored_runs"
PROMPTS = ["Name a fruit.", "Say hello.", "Why is the sky blue?"]
PAIRS = [{"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "I do not know any fruit at all."},
         {"prompt": "Say hello.", "chosen": "Hello!", "rejected": "No."},
         {"prompt": "Why is the sky blue?", "chosen": "Light scatters.", "rejected": "It is green."}]
UNPAIRED = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in PAIRS] + \
           [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in PAIRS]
LORA = dict(lora_r=4, lora_alpha=8, lr=1e-2, seed=0)
SETTINGS = {
    "ppo": dict(steps=3, batch_size=2, mini_batch_size=2, ppo_epochs=2, max_new_tokens=4, **LORA),
    "rloo": dict(steps=3, prompts_per_step=2, k=2, mini_batch_size=4, max_new_tokens=4, **LORA),
    "grpo": dict(steps=3, prompts_per_step=2, k=2, mini_batch_size=2, epochs=2, max_new_tokens=4, **LORA),
    "dpo": dict(steps=3, batch_size=2, max_completion_tokens=8, **LORA),
    "kto": dict(steps=3, batch_size=4, max_completion_tokens=8, **LORA),
}
# the metrics each algorithm's step reports that a resumed step must reproduce
COMPARED = {"ppo": ("policy_loss", "value_loss", "reward_mean", "kl"), "rloo": ("policy_loss", "reward_mean"),
            "grpo": ("policy_loss", "reward_mean"), "dpo": ("loss", "reward_margin"), "kto": ("loss", "kl")}


def tiny_llama(folder: Path, tokenizer_dir: str):
    """The fixture's model: tiny random-weight Llama (seed 0), fp32 on the CPU."""
    from rlhf_studio.components.models import load_model
    from tests.tiny_models import write_tiny_model
    return load_model(str(write_tiny_model("llama", folder, tokenizer_dir, seed=0)), device="cpu", dtype="fp32")


def reward():
    """A reward that needs no model: counts frequent tokens (the k samples of a prompt score differently)."""
    from rlhf_studio.components.training.rewards import TokenCountReward
    return TokenCountReward(range(2000))


def trainer(lm, algorithm: str, **extra):
    from rlhf_studio.components.training import build_trainer, config_class
    cfg = config_class(algorithm)(**SETTINGS[algorithm], **extra)
    if algorithm in ("dpo", "kto"):
        return build_trainer(lm, algorithm, cfg, rows=PAIRS if algorithm == "dpo" else UNPAIRED)
    return build_trainer(lm, algorithm, cfg, prompts=PROMPTS, reward_fn=reward())


def adapter_tensors(tr) -> dict:
    return {k: v.clone() for k, v in tr._adapter_state().items()}


def write(folder: Path) -> None:
    import torch
    from safetensors.torch import save
    from rlhf_studio.components.models import load_model
    torch.set_num_threads(1)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    lm = tiny_llama(folder, load_model("embedded").source_path)
    for algorithm in SETTINGS:
        tr = trainer(lm, algorithm)
        tr.step()
        (FIXTURES / f"{algorithm}.safetensors").write_bytes(tr.state_bytes())
        m = tr.step()
        metrics = {k: float(m[k]) for k in COMPARED[algorithm]}
        (FIXTURES / f"{algorithm}.next.safetensors").write_bytes(
            save(adapter_tensors(tr), metadata={"metrics": json.dumps(metrics)}))
        print(algorithm, metrics)


if __name__ == "__main__":
    import tempfile
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as d:
        write(Path(d) / "llama")
