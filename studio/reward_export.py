"""`Studio.export_reward_model`: one stored reward-model version as a transformers sequence classifier folder.

Gathers what components/reward/export.py needs from the studio (the version's weights, its completions and
the studio's scores of them), writes the folder, then reloads it as another engine would and measures the
agreement on the version's held-out pairs (saved in the folder's studio_export.json and returned).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from .errors import StudioError

MAX_FIT_TEXTS = 2048      # completions used to distil the part the classifier cannot hold exactly


def export_reward_model(studio, version: int, path: str) -> dict:
    from rlhf_studio.components.reward import export as ex
    from rlhf_studio.components.reward.extract import encode_texts
    rs = studio.reward
    rec = studio.store.reward_version(version)
    if rec.get("weights") is None:
        raise StudioError(f"reward version {version} kept only its metrics (automatic fast refits store weights "
                          "every few labels); export a version that has weights, e.g. the newest")
    cfg = rec["config"] if isinstance(rec["config"], dict) else json.loads(rec["config"] or "{}")
    if cfg.get("model_revision") not in (None, studio.lm.revision):
        raise StudioError(f"reward version {version} was trained on another base model "
                          f"({cfg.get('model_revision')}); load that model to export it")
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise StudioError(f"{path!r} exists and is not an empty folder; choose a new folder")
    pairs = studio.store.preference_pairs(rec["criterion"] if not str(rec["criterion"]).startswith("{")
                                          else json.loads(rec["criterion"]))
    ids = list(dict.fromkeys(int(i) for i in np.concatenate([pairs["chosen_id"], pairs["rejected_id"]])))
    held = pairs[pairs["heldout"]]
    # the studio's own completions, the held-out pairs' first, then the labelled ones, then the newest others
    others = [int(i) for i in studio.store.completions()["id"].iloc[::-1]]
    keep = [int(i) for i in np.concatenate([held["chosen_id"], held["rejected_id"]])] + ids + others
    ids = list(dict.fromkeys(keep))[:MAX_FIT_TEXTS]
    prompts, texts = rs.texts(ids)
    H = int(studio.lm.model.config.hidden_size)
    last = None
    if rec["tier"] == "fast":
        from rlhf_studio.components.reward.fast import FastRewardModel
        model = FastRewardModel.from_bytes(rec["weights"])
        feats = rs.features(ids)
        X = np.stack([feats[i] for i in ids])
        scores, _ = model.score(X)
        # the features begin with the final hidden state at the last token, the state the classifier reads,
        # unless a text was cut to the studio's max_tokens (the export reads it whole) or the base is not fp32
        seqs, _ = encode_texts(studio.lm, prompts, texts, max_tokens=10 ** 9)
        if max(map(len, seqs)) <= rs.settings.feature_max_tokens and _fp32(studio.lm):
            last = X[:, :H]
        exact = np.asarray(model.weight[:H] / model.std[:H])
        adapter = None
    else:
        model, scores, exact, last = _deep(studio, rec, prompts, texts, H)
        adapter = (studio.lm.model, model.adapter_name)
    info = {"version": int(version), "tier": rec["tier"], "base_model": studio.model_id,
            "base_revision": studio.lm.revision}
    try:
        with studio.lm.lock:
            meta = ex.write_export(studio.lm, path, exact, prompts, texts, scores, adapter=adapter, info=info,
                                   last_states=last)
        pos = {i: k for k, i in enumerate(ids)}
        hp = [(pos[int(c)], pos[int(r)]) for c, r in zip(held["chosen_id"], held["rejected_id"])
              if int(c) in pos and int(r) in pos]
        used = sorted({k for p in hp for k in p})
        sub = {k: j for j, k in enumerate(used)}
        check = ex.verify_export(path, [prompts[k] for k in used], [texts[k] for k in used],
                                 np.asarray(scores)[used], [(sub[a], sub[b]) for a, b in hp])
    except Exception:
        shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        if rec["tier"] == "deep" and rs.deep is not model:
            rs.deep, rs.deep_version = None, None     # the service reloads its own version on next use
    meta.update(heldout_pairs=check["pairs"], heldout_pairs_ranked_alike=check["pairs_ranked_alike"],
                heldout_max_abs_diff=check["max_abs_diff"], path=os.fspath(path))
    with open(os.path.join(path, "studio_export.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def _fp32(lm) -> bool:
    import torch
    return lm.dtype == torch.float32 and not lm.quantization


def _deep(studio, rec, prompts, texts, H):
    """(the version's DeepRewardModel, its scores of the texts, exact last-token weight, the last-token states
    the head read, or None where a text was cut to the model's max_tokens) for a deep version."""
    import torch
    from rlhf_studio.components.reward.deep import DeepRewardModel
    from rlhf_studio.components.reward.extract import encode_texts
    rs = studio.reward
    rs.wait_idle()
    model = rs.deep if rs.deep is not None and rs.deep_version == int(rec["id"]) else \
        DeepRewardModel.from_bytes(studio.lm, rec["weights"], replace_adapter=True)
    seen: list = []
    hook = model.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0][:, :H].detach()))
    scores = []
    try:
        with torch.no_grad():
            for i in range(0, len(texts), 8):
                # score_texts keeps the order, so `seen` lines up with `texts` row for row
                s = model.score_texts(list(zip(prompts[i:i + 8], texts[i:i + 8])))
                scores.append(s.double().cpu().numpy())
    finally:
        hook.remove()
    seqs, _ = encode_texts(studio.lm, prompts, texts, max_tokens=10 ** 9)
    cut = max(map(len, seqs)) > model.config.max_tokens
    # states of a half-precision base would differ from the fp32 export's own: those are recomputed
    last = None if cut or not _fp32(studio.lm) else torch.cat(seen).double().cpu().numpy()
    pw = model.probe_weight
    fold = lambda h: (h.weight[:H] / h.std[:H]).detach().double().cpu().numpy()  # noqa: E731
    exact = (1.0 - pw) * fold(model.head) + (pw * fold(model.probe_head) if pw else 0.0)
    return model, np.concatenate(scores), exact, last
