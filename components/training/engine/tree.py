"""Prompt-tree rows: a pass's rows as one sequence with no padding and no prompt computed twice.

The rows of a training pass repeat prompt tokens: every chat prompt starts with the same system text, RLOO and
GRPO sample k completions of each prompt, DPO scores a pair's chosen and rejected completions under the same
prompt, KTO's KL estimate pairs each prompt with another completion. Laid out as a tree (the prefix every row
shares, then each distinct prompt's remaining tokens, then each row's own response up to its last real token)
each token is computed once. The tree is packed into one sequence [1, T], one group after another:

    [shared prefix] [prompt 1's rest][response a][response b] [prompt 2's rest][response c] ...

Every token keeps the position id it has in its own row. Attention (components/attention.py,
`tree_attention_forward`) is one call per block: the shared prefix causally, then each group seeing the whole
prefix and, inside the group, a mask in which the prompt's rest is causal and each response sees that rest and
itself causally (a very long group is split into one block per response). The result is the padded pass's,
rounding aside, gradients included; padding after a response's end gets zeros instead of numbers nobody reads.

Used on the CPU (engine/acceleration.py `row_layout`), where a pass costs what its tokens cost: with SmolLM2's
~30-token system prompt and completions of uneven length, a third or more of a padded batch's positions are not
needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...attention import TREE, attention_implementation, register_tree_attention

MAX_GROUP_BLOCK = 512
"""A group of more tokens than this attends response by response (a group's mask grows with its square)."""


@dataclass
class TreeBlock:
    """One attention call: queries [start, end) of the packed sequence see keys `keys` (ranges, in order)
    through `mask` [end - start, total key length] (True: may attend); mask None: causal over one range."""
    start: int
    end: int
    keys: list[tuple[int, int]]
    mask: torch.Tensor | None


@dataclass
class TreeLayout:
    ids: torch.Tensor          # [1, T] int64
    positions: torch.Tensor    # [1, T] int64, each token's position in its own row
    blocks: list[TreeBlock]    # query ranges tile [0, T) in order
    predicting: torch.Tensor   # [N] int64: the index in T of the hidden state predicting each real response token
    rows: torch.Tensor         # [N] int64: that token's row
    cols: torch.Tensor         # [N] int64: and its column in the response
    longest: int               # the longest row, prompt + response (a sliding window must not be shorter)
    token_of: list[list[int]]  # per row: the index in T of each of its real tokens, prompt then response


def _group_mask(prefix: int, rest: int, lengths: list[int]) -> torch.Tensor:
    """[G, prefix + G] for a group of G = rest + sum(lengths) tokens: all of the prefix; the rest causal; each
    response the rest and itself causally."""
    G = rest + sum(lengths)
    seg = torch.cat([torch.full((rest,), -1)] + [torch.full((n,), j) for j, n in enumerate(lengths)])
    idx = torch.arange(G)
    inside = (idx[None, :] <= idx[:, None]) & ((seg[None, :] == -1) | (seg[None, :] == seg[:, None]))
    return torch.cat([torch.ones((G, prefix), dtype=torch.bool), inside], dim=1)


def _causal_after(seen: int, n: int) -> torch.Tensor:
    """[n, seen + n]: everything of `seen` earlier keys, then causal over the block's own n."""
    return torch.cat([torch.ones((n, seen), dtype=torch.bool), torch.ones((n, n), dtype=torch.bool).tril()], 1)


def tree_layout(query_ids: torch.Tensor, query_mask: torch.Tensor, response_mask: torch.Tensor,
                response_ids: torch.Tensor, share_prefix: bool = True) -> TreeLayout:
    """The rows as a prompt tree (module docs). query_ids/query_mask [B, P] left-padded; response_ids /
    response_mask [B, R], the mask 1 on a prefix of each row (up to and including EOS). share_prefix=False:
    no common prefix is taken out (distinct prompts are still computed once)."""
    from .rollout import shared_prefix_length
    B, P = query_ids.shape
    prompts = [ids[P - n:] for ids, n in zip(query_ids.tolist(), query_mask.long().sum(1).tolist())]
    lengths = response_mask.long().sum(1).tolist()
    responses = response_ids.tolist()
    n = shared_prefix_length(query_ids, query_mask) if share_prefix else 0
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p[n:]), []).append(i)
    ids, positions = list(prompts[0][:n]), list(range(n))
    blocks = [TreeBlock(0, n, [(0, n)], None)] if n else []
    pred: list[int] = []
    token_of: list[list[int]] = [[] for _ in range(B)]
    rows: list[int] = []
    cols: list[int] = []
    for rest, members in groups.items():
        start = len(ids)
        ids += rest
        positions += range(n, n + len(rest))
        last = start + len(rest) - 1 if rest else n - 1       # the hidden state predicting a response's first
        spans = []
        for i in members:
            r0 = len(ids)
            ln = lengths[i]
            ids += responses[i][:ln]
            positions += range(n + len(rest), n + len(rest) + ln)
            spans.append((r0, ln))
            token_of[i] = list(range(n)) + list(range(start, start + len(rest))) + list(range(r0, r0 + ln))
            pred += [last] + list(range(r0, r0 + ln - 1)) if ln else []
            rows += [i] * ln
            cols += range(ln)
        end = len(ids)
        if end - start <= MAX_GROUP_BLOCK:
            blocks.append(TreeBlock(start, end, [(0, n), (start, end)],
                                    _group_mask(n, len(rest), [ln for _, ln in spans])))
            continue
        if rest:
            blocks.append(TreeBlock(start, start + len(rest), [(0, n), (start, start + len(rest))],
                                    _causal_after(n, len(rest))))
        for r0, ln in spans:
            if ln:
                blocks.append(TreeBlock(r0, r0 + ln, [(0, n), (start, start + len(rest)), (r0, r0 + ln)],
                                        _causal_after(n + len(rest), ln)))
    dev = query_ids.device
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=dev)    # noqa: E731
    longest = max(len(p) + ln for p, ln in zip(prompts, lengths))
    return TreeLayout(as_long(ids)[None], as_long(positions)[None], blocks, as_long(pred), as_long(rows),
                      as_long(cols), longest, token_of)


def tree_hidden(decoder, layout: TreeLayout) -> torch.Tensor:
    """The decoder's final hidden states [1, T, H] of the packed tree."""
    register_tree_attention()
    with attention_implementation(decoder.config, TREE):
        return decoder(input_ids=layout.ids, position_ids=layout.positions, use_cache=False,
                       tree_blocks=layout.blocks, tree_max_len=layout.longest).last_hidden_state


def scatter_rows(values: torch.Tensor, layout: TreeLayout, shape: tuple[int, int]) -> torch.Tensor:
    """[N] per real response token -> [B, R], zeros after each row's end (differentiable)."""
    out = values.new_zeros(shape)
    return out.index_put((layout.rows, layout.cols), values)


def in_row_layout(hidden: torch.Tensor, layout: TreeLayout, query_mask: torch.Tensor,
                  response_mask: torch.Tensor) -> torch.Tensor:
    """The tree's hidden states [1, T, H] in the batch's own layout [B, P + R, H] (prompt left-padded, response
    after it), zeros at padding: what the reward reads from the reference pass."""
    B, P = query_mask.shape
    R = response_mask.shape[1]
    lens = query_mask.long().sum(1).tolist()
    index = torch.zeros((B, P + R), dtype=torch.long)
    valid = torch.zeros((B, P + R, 1), dtype=hidden.dtype)
    for i, tokens in enumerate(layout.token_of):
        cols = list(range(P - lens[i], P)) + list(range(P, P + len(tokens) - lens[i]))
        index[i, cols] = torch.tensor(tokens, dtype=torch.long)
        valid[i, cols] = 1
    return hidden[0][index.to(hidden.device)] * valid.to(hidden.device)
