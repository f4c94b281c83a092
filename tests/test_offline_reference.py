"""The offline engine's reference pass: the cache of labelled rows' reference sums (`cache_reference`) changes no
number over several passes over the data while running fewer reference rows, and KTO's single reference pass
over the rows and the mismatched rows gives what four separate passes gave."""
from __future__ import annotations

import pytest
import torch

from tests.stored_runs import PAIRS, UNPAIRED, tiny_llama

COMPARED = {"dpo": ("loss", "reward_margin", "reward_accuracy", "logp_chosen", "grad_norm"),
            "kto": ("loss", "kl", "reward_desirable", "reward_undesirable", "grad_norm")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, lm):
    torch.set_num_threads(1)
    return tiny_llama(tmp_path_factory.mktemp("reference") / "llama", lm.source_path)


def counting(tr) -> list[int]:
    """Wrap the trainer's forward so that each reference forward records how many rows it scored."""
    rows, forward = [], tr.sequence_logps

    def sequence_logps(b, reference=False):
        if reference:
            rows.append(int(b.response_ids.shape[0]))
        return forward(b, reference)
    tr.sequence_logps = sequence_logps
    return rows


def run(lm, algorithm: str, cache: bool, steps: int):
    from rlhf_studio.components.training import build_trainer, config_class
    # 3 pairs (6 unpaired rows) in steps of 2 (4): the passes straddle steps, so a step mixes cached rows with new
    batch = 2 if algorithm == "dpo" else 4
    cfg = config_class(algorithm)(steps=steps, batch_size=batch, max_completion_tokens=8, lora_r=4, lora_alpha=8,
                                  lr=1e-2, seed=0, cache_reference=cache)
    tr = build_trainer(lm, algorithm, cfg, rows=PAIRS if algorithm == "dpo" else UNPAIRED)
    rows = counting(tr)
    return [tr.step() for _ in range(steps)], rows


@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_cached_reference_changes_no_number_and_runs_fewer_rows(tiny, algorithm):
    steps = 6                                   # DPO: 4 passes over 3 pairs; KTO: 4 passes over 6 rows
    cached, cached_rows = run(tiny, algorithm, True, steps)
    plain, plain_rows = run(tiny, algorithm, False, steps)
    for step, (a, b) in enumerate(zip(cached, plain)):
        for k in COMPARED[algorithm]:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), (step, k)
    assert cached[-1]["loss"] != pytest.approx(cached[0]["loss"], abs=1e-4)     # the policy moved meanwhile
    per_step = 4 if algorithm == "dpo" else 8   # DPO: chosen + rejected; KTO: rows + mismatched rows
    assert plain_rows == [per_step] * steps     # one reference forward a step, every row
    if algorithm == "dpo":      # every pair scored once: 2 steps score 4 + 2 completions, then none at all
        assert cached_rows == [4, 2]
    else:                       # each row's sum once (6 in all); the 4 mismatched rows every step
        assert sum(cached_rows) == 6 + 4 * steps and all(n >= 4 for n in cached_rows)


def test_kto_one_reference_pass_equals_the_four_pass_step(tiny):
    """The step's loss and metrics against the pre-merge recipe: policy and reference over the rows, then policy
    and reference over the mismatched rows, each its own forward."""
    from rlhf_studio.components.training.kto import kto_kl, kto_loss
    from rlhf_studio.components.training import build_trainer, config_class
    cfg = config_class("kto")(steps=3, batch_size=4, max_completion_tokens=8, lora_r=4, lora_alpha=8, lr=1e-2,
                              seed=0, cache_reference=False)
    tr = build_trainer(tiny, "kto", cfg, rows=UNPAIRED)
    tr.step()                                   # the adapter moves off zero: policy != reference
    rows = UNPAIRED[1:5]
    prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    with torch.no_grad():
        b = tr.encode(prompts, completions)
        mis = tr.encode(prompts, completions[1:] + completions[:1])
        logp, ref = tr.sequence_logps(b)[0], tr.sequence_logps(b, reference=True)[0]
        kl = kto_kl(tr.sequence_logps(mis)[0], tr.sequence_logps(mis, reference=True)[0])
        want, rewards = kto_loss(logp, ref, torch.tensor([r["label"] for r in rows]), kl, cfg.beta)
        loss, metrics = tr.loss_and_metrics(rows)
    assert float(kl) > 0                        # the estimate is not the clamp's zero
    assert float(loss) == pytest.approx(float(want.mean()), rel=1e-6, abs=1e-6)
    assert metrics["kl"] == pytest.approx(float(kl), rel=1e-5, abs=1e-6)
    assert metrics["reward_desirable"] == pytest.approx(float(rewards[torch.tensor([r["label"] for r in rows])]
                                                              .mean()), rel=1e-5, abs=1e-6)


def test_cache_reference_is_a_validated_setting():
    from rlhf_studio.components.training.dpo import DPOConfig
    from rlhf_studio.components.training.kto import KTOConfig
    with pytest.raises(ValueError, match="cache_reference must be true or false"):
        DPOConfig(cache_reference="yes")
    assert KTOConfig.from_dict(KTOConfig(cache_reference=False).to_dict()).cache_reference is False
