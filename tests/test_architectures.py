"""Any causal LM: generation, both reward tiers, PPO and the reward export on tiny random-weight models of the
architectures users bring (Llama, Qwen2, Qwen3, Gemma 2, Gemma 3, Mistral, Phi-3; one with no chat template and
one whose template has no system prompt, so rows share no prompt prefix). Every shortcut either computes what
the model itself computes or is switched off for that model, with a note on the run (tests/tiny_models.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny_models import ARCHITECTURES, write_tiny_model

PROMPTS = ["Name a fruit.", "Why is the sky blue today?", "Hi"]
# which shortcut each model cannot take, and why (checked: the others must be taken and agree)
NO_FAST_SAMPLER = {"gemma3_text"}                  # sliding window (16) shorter than the sequence
NO_PACKING = {"gemma2", "gemma3_text"}             # attention softcap; the short sliding window
NO_SHARED_PREFIX = {"gemma3_text"}                 # the short sliding window
NO_PREFIX_IN_PROMPTS = {"mistral", "llama_no_template"}    # nothing before the user's words


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, lm):
    """name -> LoadedModel (fp32, CPU), built on first use."""
    from rlhf_studio.components.models import load_model
    root, made = tmp_path_factory.mktemp("tiny"), {}

    def get(name):
        if name not in made:
            folder = write_tiny_model(name, root / name, lm.source_path)
            made[name] = load_model(str(folder), device="cpu", dtype="fp32")
        return made[name]
    return get


def _model_logp(model, q, qm, resp, rm, temperature):
    """Log-probs of the response as the model's own forward computes them (its logits, padded rows)."""
    ids, am = torch.cat([q, resp], 1), torch.cat([qm, rm], 1)
    logits = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    logits = logits[:, q.shape[1] - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, resp[..., None])[..., 0]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generation_and_the_fast_sampler(tiny, arch):
    from rlhf_studio.components import fastgen
    from rlhf_studio.components.generation import SamplingParams, generate
    from rlhf_studio.components.training.engine.rollout import encode_prompts, left_pad, shared_prefix_length
    lm = tiny(arch)
    assert lm.has_chat_template == (arch != "llama_no_template")
    outs = generate(lm, "Name a fruit.", SamplingParams(n=2, max_new_tokens=4, seed=0))
    assert len(outs) == 2 and all(isinstance(o.text, str) for o in outs)
    q, qm = left_pad(encode_prompts(lm, PROMPTS, 256), lm.pad_token_id)
    assert (shared_prefix_length(q, qm) == 0) == (arch in NO_PREFIX_IN_PROMPTS)
    kw = dict(temperature=0.0, eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id)
    plain = fastgen.plain_generate(lm.model, q, qm, 5, **kw)
    if arch in NO_FAST_SAMPLER:
        with pytest.raises(fastgen.FastGenUnsupported, match="sliding-window"):
            fastgen.fast_generate(lm.model, q, qm, 5, **kw)
    else:                                           # greedy: the same tokens as model.generate
        assert torch.equal(fastgen.fast_generate(lm.model, q, qm, 5, **kw).sequences, plain.sequences)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_policy_passes_equal_the_models_own_forward(tiny, arch):
    """forward_response with each shortcut (shared prefix, fused LoRA, packed rows, the CPU's prompt tree) gives the
    log-probs of the model's own forward (Gemma 2's final logit softcap included); a shortcut a model cannot take
    is skipped inside forward_response (the shared prefix) or refused before (packing and the tree:
    `packing_supported`)."""
    from rlhf_studio.components.attention import packing_supported, prefix_sharing_supported
    from rlhf_studio.components.fused_lora import fused_lora
    from rlhf_studio.components.training.engine.rollout import (encode_prompts, forward_response, left_pad,
                                                                mask_after_eos, sample)
    from tests.layers import attach_moved_policy
    lm = attach_moved_policy(tiny(arch), 4, 8, "arch-test", std=0.05)
    model = lm.model
    q, qm = left_pad(encode_prompts(lm, PROMPTS, 256), lm.pad_token_id)
    resp = sample(model, q, qm, 5, 0.7, 1.0, lm.eos_token_id, lm.pad_token_id)
    rm, _ = mask_after_eos(resp, lm.eos_token_id)
    resp = torch.where(rm.bool(), resp, torch.full_like(resp, lm.pad_token_id))
    keep, longest = rm.bool(), q.shape[1] + resp.shape[1]
    cfg = model.get_base_model().config
    assert packing_supported(cfg, longest) == (arch not in NO_PACKING)
    assert prefix_sharing_supported(cfg, longest) == (arch not in NO_SHARED_PREFIX)
    with torch.no_grad():
        want = _model_logp(model, q, qm, resp, rm, 0.7)
        for share, fused, pack in [(False, False, False), (True, False, False), (False, True, False),
                                   (True, True, False), (False, True, True), (True, True, "tree")]:
            if pack and arch in NO_PACKING:
                continue
            with fused_lora(model) if fused else torch.no_grad():
                got = forward_response(model, q, qm, resp, rm, 0.7, share_prefix=share, pack=pack).logp
            assert torch.allclose(got[keep], want[keep], atol=1e-4), (share, fused, pack)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_both_reward_tiers(tiny, arch):
    """Fast tier: features and a fit. Deep tier: its cached-trunk pass (the upper layers run from the hidden
    states entering them) scores exactly like the probe on the full pass while its LoRA B is zero; one update."""
    from rlhf_studio.components.reward.deep import DeepRewardConfig, DeepRewardModel, DeepRewardTrainer
    from rlhf_studio.components.reward.extract import extract_features
    from rlhf_studio.components.reward.fast import FastRewardModel
    lm = tiny(arch)
    prompts = ["Name a fruit.", "Name a fruit.", "Say hi.", "Say hi."]
    texts = ["Apple.", "I am not sure what a fruit is.", "Hi!", "Well, let me think about hello."]
    X = extract_features(lm, prompts, texts)
    assert X.shape == (4, 2 * lm.model.config.hidden_size) and np.isfinite(X).all()
    fast = FastRewardModel().fit(X[[0, 2]], X[[1, 3]], l2=1.0)
    cfg = DeepRewardConfig(lora_r=4, lora_alpha=8, lora_layers=1, epochs=1, batch_size=2, micro_batch_size=2,
                           probe_weight=0.0)
    deep = DeepRewardModel(lm, cfg, adapter_name="arch-reward", probe=fast)
    assert deep.split == 1
    assert np.allclose(deep.score(prompts, texts), fast.score(X)[0], atol=1e-4)
    metrics = DeepRewardTrainer(lm, cfg, adapter_name="arch-reward", probe=fast).train(
        [(prompts[0], texts[0], texts[1]), (prompts[2], texts[2], texts[3])])
    assert np.isfinite(metrics["loss"])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_ppo_step_with_notes_on_what_it_skipped(tiny, arch):
    from rlhf_studio.components.training.ppo import PPOConfig, PPOTrainer
    from rlhf_studio.components.reward.extract import extract_features
    from rlhf_studio.components.reward.fast import FastRewardModel
    lm = tiny(arch)
    X = extract_features(lm, ["Hi", "Hi"], ["Hello!", "Go away."])
    reward = FastRewardModel().fit(X[:1], X[1:], l2=1.0).reward_fn_for_ppo(lm)
    cfg = PPOConfig(steps=1, batch_size=2, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4, lora_r=4,
                    lora_alpha=8, max_prompt_tokens=64, adapter_name="arch-ppo")
    trainer = PPOTrainer(lm, reward, cfg, prompts=PROMPTS)
    before = [p.detach().clone() for p in trainer._lora]
    metrics = trainer.step()
    assert all(np.isfinite(metrics[k]) for k in ("reward_mean", "kl", "policy_loss", "value_loss"))
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer._lora))        # the policy moved
    # one epoch of one mini-batch: the update's log-probs are the rollout's (ratio 1) wherever they came from
    assert abs(metrics["approx_kl"]) < 1e-5 and metrics["clip_frac"] == 0
    notes = " ".join(trainer.notes)
    assert ("fast sampler does not support" in notes) == (arch in NO_FAST_SAMPLER)
    assert ("not packed" in notes) == (arch in NO_PACKING)
    assert ("shared prompt prefix is not supported" in notes) == (arch in NO_SHARED_PREFIX)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reward_export_as_a_sequence_classifier(tiny, arch, tmp_path):
    """The fast tier of each architecture exported (components/reward/export.py) and reloaded through
    AutoModelForSequenceClassification scores its texts as the studio does."""
    from rlhf_studio.components.reward import export
    from rlhf_studio.components.reward.extract import encode_texts, extract_features
    from rlhf_studio.components.reward.fast import FastRewardModel
    lm = tiny(arch)
    prompts = ["Name a fruit.", "Name a fruit.", "Say hi.", "Say hi.", "Count to two."]
    texts = [" Apple.", " I am not sure.", " Hi!", " Well, hello.", " 1, 2."]
    X = extract_features(lm, prompts, texts)
    fast = FastRewardModel().fit(X[[0, 2]], X[[1, 3]], l2=1.0)
    scores, _ = fast.score(X)
    H = lm.model.config.hidden_size
    tok = export._export_tokenizer(lm)
    assert export.texts_ids(tok, prompts, texts) == encode_texts(lm, prompts, texts, 10 ** 6)[0]
    export.write_export(lm, tmp_path, fast.weight[:H] / fast.std[:H], prompts, texts, scores)
    pairs = [(a, b) for a in range(5) for b in range(a)]
    check = export.verify_export(tmp_path, prompts, texts, scores, pairs)
    assert check["pairs_ranked_alike"] == len(pairs) and check["max_abs_diff"] < 1e-2 * np.ptp(scores), check
