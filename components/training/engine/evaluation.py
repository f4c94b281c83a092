"""What the online engine's policy says outside its steps: scored samples for held-out evaluation, the
reward-hacking watch's probe, and the few samples each step shows."""
from __future__ import annotations

import torch

from .adapter import decode
from .rollout import Rollout, encode_prompts, forward_response, left_pad, mask_after_eos, sample


def prompt_text(tok, prompt) -> str:
    """A prompt as text (prompts may be given as token ids)."""
    return prompt if isinstance(prompt, str) else decode(tok, prompt)


class Evaluation:
    """Sampling and scoring outside the training steps (a mixin of OnlineEngine; reads its `lm`, `model`,
    `config`, `device`, `reward_fn` and its passes: `_reference`, `_score`, `_policy_for_generation`)."""

    def generate_samples(self, prompts: list, max_new_tokens: int | None = None, temperature: float | None = None,
                         top_p: float | None = None, greedy: bool = False, use_base: bool = False,
                         score: bool = True, batch_size: int | None = None) -> list[dict]:
        """Sample one response per prompt from the policy (or the base, use_base=True) and score it.

        Returns [{prompt, response, score (raw reward model), reward (after the missing-EOS penalty), length,
        has_eos}]. Uses the global RNG (seed it for reproducible evaluations)."""
        cfg = self.config
        mnt = max_new_tokens or cfg.max_new_tokens
        temp = temperature or cfg.temperature
        tp = top_p or cfg.top_p
        bs = batch_size or cfg.samples_per_step()
        out = []
        with self.lm.lock:
            self._activate_policy()
            self.model.eval()
            for s in range(0, len(prompts), bs):
                chunk = list(prompts[s:s + bs])
                ctx = self.model.disable_adapter() if use_base else self._policy_for_generation()
                with torch.no_grad():
                    seqs = encode_prompts(self.lm, chunk, cfg.max_prompt_tokens)
                    q, qm = left_pad(seqs, self.lm.pad_token_id, self.device)
                    with ctx:
                        resp = sample(self.model, q, qm, mnt, temp, tp, self.lm.eos_token_id,
                                      self.lm.pad_token_id, greedy=greedy,
                                      merge_lora=self._merge_in_sampler and not use_base)
                    rmask, has_eos = mask_after_eos(resp, self.lm.eos_token_id)
                    resp = torch.where(rmask.bool(), resp, torch.full_like(resp, self.lm.pad_token_id))
                    ro = Rollout(q, qm, resp, rmask, has_eos, chunk)
                    if score:
                        _, hidden = self._reference(ro, bool(getattr(self.reward_fn, "uses_base_hidden", False)))
                        raw, sc = self._score(ro, hidden)
                for i in range(len(chunk)):
                    ids = resp[i, : int(rmask[i].sum())].tolist()
                    d = {"prompt": prompt_text(self.lm.tokenizer, chunk[i]),
                         "response": decode(self.lm.tokenizer, ids), "length": len(ids),
                         "has_eos": bool(has_eos[i])}
                    if score:
                        d["score"], d["reward"] = float(raw[i]), float(sc[i])
                    out.append(d)
        return out

    @torch.no_grad()
    def probe(self, prompts: list, max_new_tokens: int | None = None, seed: int = 0) -> dict:
        """What the reward-hacking watch (components/training/watch.py) reads: one response per prompt, sampled from
        the policy at the training temperature with a fixed seed (the same random stream at every check), the
        global RNG restored afterwards so that probing does not change the run. Returns, for B prompts:
        {"prompts": [B] text, "responses": [B] text, "token_ids": [B] lists of response ids (up to EOS),
        "has_eos": [B] bool, "score": [B] float (raw reward model), "kl": [B] float (sum over the response of
        log pi - log ref, the trainer's KL estimate), "features": tensor [B, 2H] (pooled base features, what the
        fast reward tier reads)}."""
        from ...reward.features import pool_features
        cfg = self.config
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        torch.manual_seed(seed)
        try:
            with self.lm.lock:
                self._activate_policy()
                self.model.eval()
                q, qm = left_pad(encode_prompts(self.lm, prompts, cfg.max_prompt_tokens), self.lm.pad_token_id,
                                 self.device)
                with self._policy_for_generation():
                    resp = sample(self.model, q, qm, max_new_tokens or cfg.max_new_tokens, cfg.temperature,
                                  cfg.top_p, self.lm.eos_token_id, self.lm.pad_token_id,
                                  merge_lora=self._merge_in_sampler)
                rmask, has_eos = mask_after_eos(resp, self.lm.eos_token_id)
                resp = torch.where(rmask.bool(), resp, torch.full_like(resp, self.lm.pad_token_id))
                ro = Rollout(q, qm, resp, rmask, has_eos, list(prompts))
                logp = forward_response(self.model, q, qm, resp, rmask, cfg.temperature,
                                        share_prefix=cfg.share_prompt_prefix, pack=self.pack_rows).logp
                ref_logp, hidden = self._reference(ro, want_hidden=True)
                raw, _ = self._score(ro, hidden)
                feats = pool_features(hidden, ro.attention_mask, ro.full_response_mask)
        finally:
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        ids = [resp[i, : int(rmask[i].sum())].tolist() for i in range(len(prompts))]
        return {"prompts": [prompt_text(self.lm.tokenizer, p) for p in prompts],
                "responses": [decode(self.lm.tokenizer, x) for x in ids], "token_ids": ids,
                "has_eos": [bool(x) for x in has_eos], "score": [float(x) for x in raw],
                "kl": [float(x) for x in ((logp - ref_logp) * rmask).sum(1)], "features": feats.cpu()}

    def _display(self, ro: Rollout, scores: torch.Tensor) -> list[dict]:
        """The first `n_display_samples` (prompt, response, reward) of a step's rollout, for its metrics."""
        tok = self.lm.tokenizer
        return [{"prompt": prompt_text(tok, ro.prompts[i]),
                 "response": decode(tok, ro.response_ids[i, : int(ro.response_mask[i].sum())].tolist()),
                 "reward": float(scores[i])} for i in range(min(self.config.n_display_samples, len(ro.prompts)))]
