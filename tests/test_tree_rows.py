"""Prompt-tree rows (components/training/engine/tree.py): on the CPU a pass runs the shared prompt prefix and each
distinct prompt once, with no padding. It must compute what the padded pass computes: log-probs, values, entropy
and hidden states at every real token, LoRA gradients; zeros after a row's end. The trainers take it on the CPU
and train as they do without it.

On the real embedded model (fp32) cut to its first decoder layers, with a policy adapter whose B is non-zero.
"""
from __future__ import annotations

import pytest
import torch

import rlhf_studio.components.training.engine.tree as tree
from rlhf_studio.components.fused_lora import fused_lora
from rlhf_studio.components.training.engine.rollout import (encode_prompts, forward_response, left_pad,
                                                            mask_after_eos, sample)
from tests.layers import attach_moved_policy, keep_first_layers

# k = 2 completions of two prompts, one prompt alone, the repeats not next to each other
PROMPTS = ["Write a haiku about autumn.", "Why is the sky blue?", "Write a haiku about autumn.",
           "Name one prime number, please, and say why it is prime.", "Why is the sky blue?"]


def test_layout_on_hand_made_rows():
    pad = 0
    q = torch.tensor([[pad, 5, 6, 7, 8],
                      [pad, 5, 6, 7, 8],
                      [pad, pad, 5, 6, 9]])
    r = torch.tensor([[11, 12, pad], [13, pad, pad], [14, 15, 16]])
    rm = (r != pad).long()
    lay = tree.tree_layout(q, (q != pad).long(), rm, r)
    # prefix 5 6 (each row keeps a prompt token of its own), prompt 7 8 once for rows 0 and 1, then 9 for row 2
    assert lay.ids[0].tolist() == [5, 6, 7, 8, 11, 12, 13, 9, 14, 15, 16]
    assert lay.positions[0].tolist() == [0, 1, 2, 3, 4, 5, 4, 2, 3, 4, 5]
    assert lay.rows.tolist() == [0, 0, 1, 2, 2, 2] and lay.cols.tolist() == [0, 1, 0, 0, 1, 2]
    assert lay.predicting.tolist() == [3, 4, 3, 7, 8, 9]      # a response's first token: its prompt's last
    assert [(b.start, b.end, b.keys) for b in lay.blocks] == [(0, 2, [(0, 2)]), (2, 7, [(0, 2), (2, 7)]),
                                                               (7, 11, [(0, 2), (7, 11)])]
    assert lay.blocks[0].mask is None                        # the prefix: plain causal
    want = torch.tensor([[1, 1, 1, 0, 0, 0, 0],              # 7: the prefix, itself
                         [1, 1, 1, 1, 0, 0, 0],              # 8
                         [1, 1, 1, 1, 1, 0, 0],              # 11: prefix, 7 8, itself
                         [1, 1, 1, 1, 1, 1, 0],              # 12
                         [1, 1, 1, 1, 0, 0, 1]], dtype=torch.bool)   # 13: not its sibling 11 12
    assert torch.equal(lay.blocks[1].mask, want)
    assert lay.token_of == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 6], [0, 1, 7, 8, 9, 10]]
    # no common prefix taken out: each group holds its whole prompt
    flat = tree.tree_layout(q, (q != pad).long(), rm, r, share_prefix=False)
    assert flat.ids[0].tolist() == [5, 6, 7, 8, 11, 12, 13, 5, 6, 9, 14, 15, 16]


@pytest.fixture(scope="module")
def policy():
    from rlhf_studio.components.models import load_model
    lm = attach_moved_policy(keep_first_layers(load_model("embedded", dtype="fp32"), 3))
    q, qm = left_pad(encode_prompts(lm, PROMPTS, 256), lm.pad_token_id)
    torch.manual_seed(0)
    resp = sample(lm.model, q, qm, 10, 1.0, 1.0, lm.eos_token_id, lm.pad_token_id)
    resp[1, 3] = lm.eos_token_id                         # rows of different lengths: one ends early
    rm, _ = mask_after_eos(resp, lm.eos_token_id)
    resp = torch.where(rm.bool(), resp, torch.full_like(resp, lm.pad_token_id))
    torch.manual_seed(1)
    return lm, q, qm, resp, rm, torch.nn.Linear(lm.model.config.hidden_size, 1)


def _pass(policy, **layout):
    lm, q, qm, resp, rm, vh = policy
    params = [p for n, p in lm.model.named_parameters() if "lora_" in n]
    for p in params:
        p.grad = None
    with fused_lora(lm.model):
        fo = forward_response(lm.model, q, qm, resp, rm, 0.7, value_head=vh, want_entropy=True, want_hidden=True,
                              **layout)
        ((fo.logp * rm).sum() + (fo.values * rm).sum()).backward()
    return fo, [p.grad.clone() for p in params]


@pytest.mark.parametrize("share_prefix, group_block", [(True, 512), (False, 512), (True, 6)])
def test_tree_pass_equals_the_padded_pass(policy, monkeypatch, share_prefix, group_block):
    """group_block 6: every group is longer, so it runs response by response (the long-group blocks)."""
    lm, q, qm, resp, rm, vh = policy
    padded, g_padded = _pass(policy, share_prefix=False)
    monkeypatch.setattr(tree, "MAX_GROUP_BLOCK", group_block)
    blocks = []
    real = tree.tree_hidden

    def spy(decoder, layout):
        blocks.append(layout.blocks)
        return real(decoder, layout)
    monkeypatch.setattr("rlhf_studio.components.training.engine.rollout.tree_hidden", spy)
    got, g_tree = _pass(policy, share_prefix=share_prefix, pack="tree")
    (seen,) = blocks
    n_groups = 3 + (share_prefix and group_block > 6)      # three distinct prompts (+ the prefix's own block)
    assert len(seen) == n_groups if group_block > 6 else len(seen) == 1 + 3 + len(PROMPTS)
    real_tokens = rm.bool()
    for k in ("logp", "values", "entropy"):
        a, b = getattr(got, k), getattr(padded, k)
        assert torch.allclose(a[real_tokens], b[real_tokens], atol=2e-4), k
        assert not a[~real_tokens].any(), k                  # zeros after each row's end
    full = torch.cat([qm, rm], dim=1).bool()
    assert torch.allclose(got.hidden[full], padded.hidden[full], atol=5e-4)
    assert not got.hidden[~full].any()
    for a, b in zip(g_tree, g_padded):
        assert torch.linalg.vector_norm(a - b) <= 1e-4 * torch.linalg.vector_norm(b) + 1e-8
    assert lm.model.config._attn_implementation == "sdpa"


def test_trainers_take_the_tree_on_the_cpu_and_train_alike():
    """DPO (a pair's two completions share their prompt) and GRPO (k completions a prompt): the engines lay
    their rows out as a tree on the CPU; two steps give the padded layout's losses and metrics."""
    from rlhf_studio.components.models import load_model
    from rlhf_studio.components.training import build_trainer, config_class
    lm = keep_first_layers(load_model("embedded", dtype="fp32"), 2)
    pairs = [{"prompt": p, "chosen": "Yes.", "rejected": "No, I do not think so at all."} for p in PROMPTS[:4]]

    def run(algorithm: str, tree_rows: bool):
        common = dict(steps=2, lr=1e-3, lora_r=4, lora_alpha=8, seed=0, tree_rows=tree_rows)
        if algorithm == "dpo":
            tr = build_trainer(lm, "dpo", config_class("dpo")(batch_size=2, **common), rows=pairs)
        else:
            cfg = config_class("grpo")(prompts_per_step=2, k=2, mini_batch_size=4, max_new_tokens=6, temperature=1.0,
                                       **common)
            tr = build_trainer(lm, "grpo", cfg, prompts=PROMPTS[:4],
                               reward_fn=lambda response_mask, **_: response_mask.sum(1).float() * -0.1)
        torch.manual_seed(0)
        return tr.pack_rows, [tr.step() for _ in range(2)]
    compared = {"dpo": ("loss", "reward_margin", "logp_chosen"), "grpo": ("policy_loss", "kl_term", "kl", "score_mean")}
    for algorithm, keys in compared.items():
        layout, want = run(algorithm, False)
        assert layout != "tree"
        layout, got = run(algorithm, True)
        assert layout == "tree", algorithm
        for g, w in zip(got, want):
            for k in keys:
                assert g[k] == pytest.approx(w[k], rel=1e-3, abs=1e-5), (algorithm, k)
