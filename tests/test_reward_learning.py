"""Reward features and both reward tiers on the real embedded model (SmolLM2-135M-Instruct, no mocks).

A synthetic preference: completions that mention a banana beat the same completion with another fruit.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rlhf_studio.components.reward.bt import pairwise_accuracy
from rlhf_studio.components.reward.deep import DeepRewardConfig, DeepRewardModel, DeepRewardTrainer
from rlhf_studio.components.reward.extract import (Cancelled, base_model_mode, extract_features, final_hidden,
                                       tokenize_pair_batch)
from rlhf_studio.components.reward.fast import FastRewardModel
from rlhf_studio.components.reward.ppo_reward import RewardFn, reward_fn_for_ppo

pytestmark = pytest.mark.slow

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def rlm():
    """A model instance of its own (fp32 for exact comparisons): the deep tier wraps lm.model in a PeftModel,
    which other test modules sharing the session's model should not see."""
    from rlhf_studio.components.models import load_model
    return load_model("embedded", dtype="fp32")


def banana_pairs():
    meals = ["breakfast", "lunch", "a snack", "dessert", "a picnic", "a road trip", "after a run", "a party",
             "a rainy day", "the beach"]
    dishes = ["smoothie", "bread", "salad", "muffin", "pancakes", "split", "yogurt bowl"]
    fruits = ["apple", "pear", "mango", "peach", "cherry", "plum", "orange"]
    styles = ["I suggest a {f} {d}.", "How about a fresh {f} {d}?", "A {f} {d} would be perfect.",
              "Try a {f} {d}, it is easy to make.", "You could make a {f} {d} at home."]
    rng = np.random.default_rng(0)
    pairs = []
    for i, meal in enumerate(meals):
        for j in range(6):
            style = styles[(i + j) % len(styles)]
            d = dishes[(i * 3 + j) % len(dishes)]
            other = fruits[(i + 2 * j) % len(fruits)]
            prompt = f"What should I have for {meal}?"
            good, bad = style.format(f="banana", d=d), style.format(f=other, d=d)
            if rng.random() < 0.5:          # vary which one is longer
                bad = bad + " Enjoy!"
            pairs.append((prompt, good, bad))
    return pairs


@pytest.fixture(scope="module")
def banana(rlm):
    pairs = banana_pairs()
    train = [p for i, p in enumerate(pairs) if i % 3 != 0][::2][:24]    # 20 pairs over all 10 prompts
    test = [p for p in pairs if p not in train]                          # the other 40
    # an older preference for the deep tier to start from: the same texts, the one ending in " Enjoy!" wins
    older = [(p, t + " Enjoy!", t) for p, c, r in train for t in (c, r.removesuffix(" Enjoy!"))]
    prompts = [p for p, _, _ in train + test + older for _ in (0, 1)]
    comps = [t for _, c, r in train + test + older for t in (c, r)]
    X = extract_features(rlm, prompts, comps, batch_size=16, max_tokens=MAX_TOKENS)
    n, m = len(train), len(train) + len(test)
    return {"train": train, "test": test, "Xc": X[0:2 * n:2], "Xr": X[1:2 * n:2],
            "Tc": X[2 * n:2 * m:2], "Tr": X[2 * n + 1:2 * m:2], "Oc": X[2 * m::2], "Or": X[2 * m + 1::2]}


def test_final_hidden_is_after_the_final_norm(rlm):
    b = tokenize_pair_batch(rlm, ["Hi there", "Name a colour"], ["Hello!", "Blue, like the sky on a clear day."], 32)
    with torch.inference_mode():
        h = final_hidden(rlm.model, b["input_ids"], b["attention_mask"])
        out = rlm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1)
        dec = rlm.model.get_decoder()(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        logits = rlm.model.lm_head(h[:, -1:])
    assert torch.allclose(logits, out.logits, atol=1e-4)
    assert torch.allclose(h[:, -1], dec.last_hidden_state[:, -1], atol=1e-4)


def test_tokenisation_keeps_the_end(rlm):
    long = "word " * 100 + "THE END"
    b = tokenize_pair_batch(rlm, ["Say something long.", "Hi"], [long, "ok"], max_tokens=40)
    ids, am, rm = b["input_ids"], b["attention_mask"], b["response_mask"]
    assert ids.shape == (2, 40) and am[0].all() and rm[0].all()        # the response alone fills 40 tokens
    assert len(rlm.prompt_ids("Hi")) + 2 < 40
    assert int(ids[0, -1]) == rlm.eos_token_id and int(ids[1, -1]) == rlm.eos_token_id
    assert "THE END" in rlm.tokenizer.decode(ids[0, -6:])
    ok_ids = rlm.tokenizer("ok", add_special_tokens=False)["input_ids"]
    assert int(rm[1].sum()) == len(ok_ids) + 1
    assert am[1, 0] == 0 and int(ids[1, 0]) == rlm.pad_token_id          # left padding
    assert (rm <= am).all()


def test_extract_features_order_batches_progress_and_stop(rlm):
    prompts = ["Hi", "Tell me a joke about cats, please.", "2+2?"]
    comps = ["Hello there, how can I help?", "No.", "It is four, of course, as everyone knows."]
    calls = []
    X = extract_features(rlm, prompts, comps, batch_size=2, max_tokens=MAX_TOKENS,
                         progress=lambda d, t: calls.append((d, t)))
    assert X.shape == (3, 2 * rlm.model.config.hidden_size) and X.dtype == np.float32
    single = np.stack([extract_features(rlm, [p], [c], max_tokens=MAX_TOKENS)[0] for p, c in zip(prompts, comps)])
    assert np.allclose(X, single, atol=1e-3)          # padding and batch order do not change a text's feature
    assert calls[-1] == (3, 3)
    with pytest.raises(Cancelled):
        extract_features(rlm, prompts, comps, batch_size=1, stop=lambda: True)


def test_fast_tier_learns_banana(banana):
    m = FastRewardModel().fit(banana["Xc"], banana["Xr"])
    ev = m.evaluate(banana["Tc"], banana["Tr"])
    assert ev["accuracy"] >= 0.9, ev
    p, s = m.prob_chosen(banana["Tc"], banana["Tr"])
    assert (p > 0.5).mean() >= 0.9 and (s > 0).all()


def test_deep_tier_learns_banana_reloads_and_leaves_the_base_alone(rlm, banana):
    enc = rlm.tokenizer(["The weather today is"], return_tensors="pt")
    with torch.no_grad():
        before = rlm.model.generate(**enc, max_new_tokens=8, do_sample=False)
    # It starts from the probe of an older preference, held weakly (the answer ending in " Enjoy!" wins; its head
    # scaled to 0.3), which gets most held-out banana pairs wrong: training on the banana labels must beat its
    # own starting point there. (Scaled to 1, six steps turned about a third of those pairs.)
    probe = FastRewardModel().fit(banana["Oc"], banana["Or"])
    w, b, mean, std = probe.to_torch_head()
    weak = (0.3 * w, 0.3 * b, mean, std)
    cfg = DeepRewardConfig(lora_layers=2, epochs=2, max_tokens=MAX_TOKENS, batch_size=8, micro_batch_size=4,
                           lr=5e-4, head_lr=2e-3)
    trainer = DeepRewardTrainer(rlm, cfg, adapter_name="reward", probe=weak)
    test = banana["test"]
    tp = [p for p, _, _ in test for _ in (0, 1)]
    tc = [t for _, c, r in test for t in (c, r)]
    s0 = trainer.score(tp, tc)
    ps, _ = probe.score(np.stack([x for pair in zip(banana["Tc"], banana["Tr"]) for x in pair]))
    assert np.allclose(s0, 0.3 * ps, atol=1e-3)       # a new deep model starts exactly at the probe
    wrong = s0[0::2] <= s0[1::2]                      # the held-out pairs its starting point gets wrong
    assert wrong.sum() >= 8, wrong.sum()

    steps = []
    metrics = trainer.train([(p, c, r, None) for p, c, r in banana["train"]], [],
                            progress=lambda s, t: steps.append((s, t)))
    assert metrics["steps"] == 6 and steps[-1] == (6, 6) and metrics["skipped_steps"] == 0
    assert np.isfinite(metrics["loss"])
    s1 = trainer.score(tp, tc)
    pw, cfg.probe_weight = cfg.probe_weight, 0.0    # the fine-tuned part on its own
    alone = trainer.score(tp, tc)
    cfg.probe_weight = pw
    acc0, acc1 = pairwise_accuracy(s0[0::2], s0[1::2]), pairwise_accuracy(s1[0::2], s1[1::2])
    fixed = float(np.mean((alone[0::2] > alone[1::2])[wrong]))
    print(f"\nheld-out accuracy {acc0:.2f} -> {acc1:.2f} (scored as the app does, probe mixed in); fine-tuned "
          f"part alone {pairwise_accuracy(alone[0::2], alone[1::2]):.2f}, {fixed:.2f} of the {int(wrong.sum())} "
          f"pairs the start got wrong")
    assert acc1 >= acc0 + 0.15, (acc0, acc1)          # scored as the app does: the probe is 0.6 of it
    assert fixed >= 0.8, fixed
    assert pairwise_accuracy(alone[0::2], alone[1::2]) >= 0.9

    # bytes: a standalone model (another adapter name on the same base) scores identically
    blob = trainer.state_bytes()
    again = DeepRewardModel.from_bytes(rlm, blob, adapter_name="reward_copy")
    assert np.allclose(again.score(tp[:6], tc[:6]), s1[:6], atol=1e-5)
    trainer2 = DeepRewardTrainer(rlm, cfg, adapter_name="reward")        # same name: re-initialised...
    trainer2.load_state_bytes(blob)                                        # ...then warm-started
    assert np.allclose(trainer2.score(tp[:4], tc[:4]), s1[:4], atol=1e-5)
    with pytest.raises(ValueError):
        DeepRewardModel.from_bytes(rlm, b"garbage")

    # PPO reward functions on tokenised batches (full forward) match score() (cached-trunk path)
    b = tokenize_pair_batch(rlm, tp[:4], tc[:4], MAX_TOKENS)
    with torch.no_grad(), base_model_mode(rlm.model):
        base_hidden = final_hidden(rlm.model, b["input_ids"], b["attention_mask"])
    fast_fn, deep_fn = reward_fn_for_ppo(probe), reward_fn_for_ppo(again)
    assert isinstance(fast_fn, RewardFn) and fast_fn.uses_base_hidden
    assert np.allclose(fast_fn(model=rlm.model, base_hidden=base_hidden, **b).numpy(), ps[:4], atol=1e-3)
    assert np.allclose(deep_fn(model=rlm.model, base_hidden=base_hidden, **b).numpy(), s1[:4], atol=1e-3)
    assert np.allclose(deep_fn(model=rlm.model, **b).numpy(), s1[:4], atol=1e-3)

    # the shared base model is unchanged: same greedy generation, no trainable reward weights
    from peft import PeftModel
    assert isinstance(rlm.model, PeftModel)
    with torch.no_grad():
        after = rlm.model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert torch.equal(before, after)
    assert not any(p.requires_grad for n, p in rlm.model.named_parameters() if "lora_" in n)
    X_after = extract_features(rlm, tp[:2], tc[:2], max_tokens=MAX_TOKENS)
    assert np.allclose(X_after, np.stack([banana["Tc"][0], banana["Tr"][0]]), atol=1e-4)


def test_deep_trainer_stop_and_replay(rlm, banana):
    cfg = DeepRewardConfig(lora_layers=2, epochs=1, max_tokens=MAX_TOKENS, batch_size=4, micro_batch_size=4,
                           replay_ratio=1.0, trunk_cache_mb=0)
    trainer = DeepRewardTrainer(rlm, cfg, adapter_name="reward_stop")
    pairs = [(p, c, r, 1.0) for p, c, r in banana["train"]]
    m = trainer.train(pairs[:4], pairs[4:12], stop=lambda: True)
    assert m["stopped"] and m["steps"] == 0 and m["pairs_replay"] == 4 and m["total_steps"] == 2
    n = {"calls": 0}

    def stop_after_one():
        n["calls"] += 1
        return n["calls"] > 1

    m = trainer.train(pairs[:4], pairs[4:12], stop=stop_after_one)
    assert m["stopped"] and m["steps"] == 1 and m["pairs_trained"] == 4
