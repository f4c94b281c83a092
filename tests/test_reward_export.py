"""A reward version exported as a transformers sequence classifier: loaded with no remote code and fed as TRL
feeds a reward model (the saved tokenizer's chat template over user prompt + assistant completion), it ranks
every held-out pair as the studio's version does, for both tiers, on the real embedded model."""
import json

import numpy as np
import pytest
import torch

from rlhf_studio import StudioError

pytestmark = pytest.mark.slow

# short answers preferred; 12 pairs, of which the studio's hash split holds some out
PAIRS = [(p, good, bad) for p, good, bads in [
    ("Name a fruit.", "Apple.", ["A fruit that many people like to eat is the apple.", "Hmm, maybe pear?"]),
    ("Say hello.", "Hello!", ["Well, hello there, how are you doing today?", "Hi... I guess."]),
    ("Name a colour.", "Blue.", ["One colour I can name is a deep shade of blue.", "Colour: unsure."]),
    ("Describe rain.", "Water falling.", ["Rain is water that falls from clouds in drops.", "Wet, grey, cold."]),
    ("Count to three.", "1, 2, 3.", ["Sure! One, two, and then three.", "1 2 3 4 5"]),
    ("Name a pet.", "A cat.", ["A common pet that people keep is a cat.", "Dog or cat."]),
] for bad in bads]
UNSEEN = [("Name a tree.", t) for t in ("Oak.", "An oak tree is a tree.", "Birch!", "Trees: pine, fir.")]


def _engine_scores(path, prompts, texts):
    """Scores as another engine computes them: AutoModelForSequenceClassification, the saved chat template."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=False).eval()
    out = []
    with torch.no_grad():
        for p, t in zip(prompts, texts):
            ids = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": t}],
                                          tokenize=True, return_dict=True, return_tensors="pt")
            out.append(float(model(**ids).logits[0, 0]))
    return np.array(out)


def _check(studio, version, path, tier):
    meta = studio.export_reward_model(version, str(path))
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and "auto_map" not in cfg
    assert cfg["pad_token_id"] == studio.lm.pad_token_id != studio.lm.eos_token_id
    pairs = studio.store.preference_pairs()
    held = pairs[pairs["heldout"]]
    assert len(held) >= 2
    ids = sorted(set(held["chosen_id"]) | set(held["rejected_id"]))
    texts = studio.store.completion_texts(ids).set_index("id").loc[ids]
    want = np.array([studio.reward.score(int(i), tier=tier)[0] for i in ids])
    # with texts the export never saw (not in the database): their agreement is reported, not promised
    w_new = np.array([studio.reward.score_text(p, t, tier=tier)[0] for p, t in UNSEEN])
    both = _engine_scores(str(path), list(texts["prompt"]) + [p for p, _ in UNSEEN],
                          list(texts["text"]) + [t for _, t in UNSEEN])
    got, g_new = both[:len(ids)], both[len(ids):]
    pos = {int(i): k for k, i in enumerate(ids)}
    alike = [np.sign(got[pos[c]] - got[pos[r]]) == np.sign(want[pos[c]] - want[pos[r]])
             for c, r in zip(held["chosen_id"], held["rejected_id"])]
    diff = float(np.abs(got - want).max())
    print(f"\n{tier}: {sum(alike)}/{len(alike)} held-out pairs ranked alike, largest score difference {diff:.2e} "
          f"(scores span {np.ptp(want):.3f}); export says {meta['heldout_max_abs_diff']:.2e}")
    same = [np.sign(g_new[a] - g_new[b]) == np.sign(w_new[a] - w_new[b]) for a in range(4) for b in range(a)]
    print(f"{tier}, unseen texts: {sum(same)}/{len(same)} pairs ranked alike, largest score difference "
          f"{np.abs(g_new - w_new).max():.3f}")
    assert all(alike)
    assert meta["heldout_pairs_ranked_alike"] == meta["heldout_pairs"] == len(held)
    assert diff < 1e-2 * max(np.ptp(want), 1e-3)
    return meta


def test_both_tiers_export_as_sequence_classifiers(studio, tmp_path):
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    studio.import_preferences(str(src), format="trl")
    studio.reward.wait_idle(timeout=300)
    fast = studio.train_reward_model(tier="fast")
    _check(studio, fast, tmp_path / "fast", "fast")
    deep = studio.train_reward_model(tier="deep", epochs=1, batch_size=4, micro_batch_size=2, max_tokens=64,
                                     lora_layers=2)
    meta = _check(studio, deep, tmp_path / "deep", "deep")
    assert meta["lora_layers_merged"] > 0
    with pytest.raises(StudioError, match="not an empty folder"):
        studio.export_reward_model(fast, str(tmp_path / "fast"))
    with pytest.raises(StudioError, match="no reward model version"):
        studio.export_reward_model(10 ** 6, str(tmp_path / "none"))


def test_reward_tab_export_button_is_for_owners(studio, tmp_path):
    """The Reward tab's handler: annotators are refused; an owner's mistakes come back as messages."""
    import gradio as gr
    from rlhf_studio.studio.app import build_app
    from rlhf_studio.studio.auth import Account, Accounts
    demo = build_app(studio, max_queue=None)
    on_export = next(f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == "on_export")
    studio.accounts = Accounts({"ana": Account("ana", "pw-ana-123", "owner"),
                                "bo": Account("bo", "pw-bo-456", "annotator")})
    assert "owner" in on_export(1, str(tmp_path / "x"), gr.Request(username="bo"))
    assert "give the id" in on_export(None, str(tmp_path / "x"), gr.Request(username="ana"))
    assert "no reward model version" in on_export(99, "x", gr.Request(username="ana"))
    assert "outside" in on_export(99, str(tmp_path / "x"), gr.Request(username="ana")).lower()  # export folder only
    assert not (tmp_path / "x").exists()
