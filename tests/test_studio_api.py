"""The notebook API of the issue, end to end on a real DuckDB file and the real model; every bad input."""
import subprocess
import sys
import time

import duckdb
import pytest

from rlhf_studio.storage import StorageError
from rlhf_studio import Studio, StudioError

pytestmark = pytest.mark.slow


def test_readme_flow(studio):
    s = studio
    cs = s.generate("Write a haiku about rain", n=4, max_new_tokens=12, temperature=0.8, seed=0)
    assert len(cs) == 4 and all(c.id and c.text is not None and c.prompt_id == cs[0].prompt_id for c in cs)
    s.rate(cs[0].id, stars=5)
    s.thumbs(cs[1].id, up=False, tags=["incorrect"])
    s.compare(cs[0].id, cs[1].id, winner="a")
    s.rank([cs[2].id, cs[0].id, cs[1].id, cs[3].id])
    out = s.critique(cs[3].id, "Too long.", rewrite="Rain on tin roofs...")
    assert {"critique_id", "rewrite_id", "rewrite_completion_id"} <= set(out)

    fb = s.feedback()
    assert sorted(fb["kind"]) == sorted(["stars", "thumbs", "pairwise", "ranking", "critique", "rewrite"])
    assert set(fb["annotator"]) == {"local"}
    assert fb["session_id"].notna().all() and fb["created_at"].notna().all()
    comp = s.completions()
    assert len(comp) == 5
    human = comp[comp["source"] == "human"].iloc[0]
    assert human["text"] == "Rain on tin roofs..." and int(human["corrects_id"]) == cs[3].id
    model_rows = comp[comp["source"] == "model"]
    for col in ("model_id", "model_revision", "seed", "prompt_tokens", "completion_tokens", "finish_reason",
                "latency_s", "params"):
        assert model_rows[col].notna().all(), col
    assert s.prompts()["text"].tolist() == ["Write a haiku about rain"]


def test_label_history_latest_wins(studio):
    cs = studio.generate("Say something kind", n=2, max_new_tokens=6, seed=1)
    studio.rate(cs[0].id, stars=2)
    studio.rate(cs[0].id, stars=4)
    cur = studio.feedback()
    assert cur[cur["kind"] == "stars"]["stars"].tolist() == [4]
    hist = studio.feedback(history=True)
    stars = hist[hist["kind"] == "stars"].sort_values("id")
    assert stars["stars"].tolist() == [2, 4]
    assert stars["superseded"].tolist() == [True, False]


def test_criteria_and_idempotency(studio):
    studio.add_criterion("helpfulness", "Does it help the user?")
    assert "helpfulness" in studio.criteria()["name"].tolist()
    cs = studio.generate("Explain rain", n=2, max_new_tokens=6, seed=2)
    studio.rate(cs[0].id, 3, criterion="helpfulness")
    studio.compare(cs[0].id, cs[1].id, "b", criterion="helpfulness")
    a = studio.rate(cs[1].id, 5, idempotency_key="click-1")
    b = studio.rate(cs[1].id, 5, idempotency_key="click-1")      # double submit
    assert a == b
    assert len(studio.feedback(history=True)) == 3
    with pytest.raises(StudioError):
        studio.rate(cs[0].id, 3, criterion="no-such-criterion")


def test_bad_inputs_write_nothing(studio):
    cs = studio.generate("Count to three", n=2, max_new_tokens=6, seed=3)
    other = studio.generate("Another prompt", n=1, max_new_tokens=4, seed=3)
    before = len(studio.feedback(history=True)), len(studio.completions()), len(studio.prompts())
    bad = [
        (lambda: studio.generate("   "), "empty"),
        (lambda: studio.generate("x " * 9000, max_new_tokens=8), "context"),
        (lambda: studio.generate("hi", n=0), "between 1 and 8"),
        (lambda: studio.generate("hi", n=9), "between 1 and 8"),
        (lambda: studio.rate(999999, 3), "999999"),
        (lambda: studio.rate(cs[0].id, 6), "1 to 5"),
        (lambda: studio.rate(cs[0].id, 0), "1 to 5"),
        (lambda: studio.compare(cs[0].id, other[0].id, "a"), "same prompt"),
        (lambda: studio.compare(cs[0].id, cs[1].id, "left"), "winner"),
        (lambda: studio.rank([cs[0].id, cs[0].id]), "permutation|once|distinct|twice"),
        (lambda: studio.rank([cs[0].id, other[0].id]), "same prompt|one prompt"),
        (lambda: studio.thumbs(123456, up=True), "123456"),
        (lambda: studio.critique(cs[0].id, "  "), "critique"),
        # checked before sampling: no prompt is left behind without its completions
        (lambda: studio.generate("hi", n=1, max_new_tokens=4, seed=1.5), "seed"),
        (lambda: studio.generate("hi", n=1, max_new_tokens=4, seed=True), "seed"),
        (lambda: studio.generate("hi", n=1, max_new_tokens=4, seed=2 ** 70), "seed"),
        (lambda: studio.generate("hi", n=True, max_new_tokens=4), "between 1 and 8"),
        (lambda: studio.generate("hi", n=1, max_new_tokens=4, top_p=None), "top_p"),
        (lambda: studio.generate("hi", n=1, max_new_tokens=4, prompt_source=""), "prompt_source"),
        (lambda: studio.add_prompts("Hello"), "list of texts"),
        # wrong types are refused, not turned into another label (up="no" was stored as a thumbs up)
        (lambda: studio.thumbs(cs[0].id, up="no"), "True .thumbs up. or False"),
        (lambda: studio.thumbs(cs[0].id, up=None), "True .thumbs up. or False"),
        (lambda: studio.thumbs(cs[0].id, False, tags="harmful"), "list of reason tags"),
        (lambda: studio.rate(float(cs[0].id) + 0.9, 5), "whole number"),
        (lambda: studio.rate("abc", 5), "whole number"),
        (lambda: studio.rate(2 ** 70, 5), "no completion"),
        (lambda: studio.rank([str(cs[0].id), str(cs[1].id)]), "whole number"),
        (lambda: studio.rank(None), "list of completion ids"),
        (lambda: studio.critique(cs[0].id, 5), "must be text"),
        (lambda: studio.compare(cs[1].id, cs[0].id, "b", idempotency_key="k"), "already used"),
        # whichever method storage's refusal comes through, it reaches the caller as a StudioError
        (lambda: studio.add_prompts(5), "list of texts"),
        (lambda: studio.next_prompt(5), "annotator must be text"),
        (lambda: studio.completions("x"), "must be an integer"),
        (lambda: studio.resume_ppo(9999), "no run with id 9999"),
        (lambda: studio.generate("hi", n=1, max_new_tokens=4, adapter=999), "no adapter with id 999"),
        (lambda: studio.import_prompts(None), "file path"),
        (lambda: studio.export("preference", "x.parquet", foo=1), "unknown export option"),
        (lambda: studio.backup(studio.db_path), "must differ"),
    ]
    studio.rate(cs[0].id, 3, idempotency_key="k")      # the key the last case reuses for another label
    before = before[0] + 1, before[1], before[2]
    for fn, pattern in bad:
        with pytest.raises(StudioError, match=pattern):
            fn()
    after = len(studio.feedback(history=True)), len(studio.completions()), len(studio.prompts())
    assert before == after


def test_unknown_model_keeps_previous(studio):
    rev = studio.lm.revision
    with pytest.raises(StudioError, match="stays loaded"):
        studio.switch_model("./definitely/not/a/model")
    assert studio.lm.revision == rev
    assert studio.generate("still works?", n=1, max_new_tokens=3)[0].id


def test_locked_file_and_not_duckdb(tmp_path, lm):
    db = tmp_path / "locked.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb,time; c=duckdb.connect({str(db)!r}); "
                               "print('ok', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(StorageError) as e:
            Studio(str(db), model=lm)
        msg = str(e.value)
        assert str(db.name) in msg and "another process" in msg and "--db" in msg
    finally:
        holder.kill()
    junk = tmp_path / "notes.duckdb"
    junk.write_bytes(b"this is not a database\n" * 200)
    with pytest.raises(StorageError, match="not a DuckDB"):
        Studio(str(junk), model=lm)
    assert junk.read_bytes().startswith(b"this is not a database")   # left untouched


def test_same_file_twice_in_one_process(tmp_path, lm):
    """A notebook that re-runs `s = Studio(path)` must not fail on its own lock."""
    path = str(tmp_path / "twice.duckdb")
    a = Studio(path, model=lm)
    b = Studio(path, model=lm)
    try:
        cs = a.generate("hello", n=1, max_new_tokens=3)
        b.rate(cs[0].id, 4)
        assert len(a.feedback()) == 1
    finally:
        a.close()
        b.close()
    with duckdb.connect(path, read_only=True) as con:
        assert con.execute("select count(*) from feedback").fetchall()[0][0] == 1


def test_prompt_library(studio, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("First prompt\n\nSecond prompt\nThird prompt\n")
    assert studio.import_prompts(str(f)) == 3
    cs = studio.generate("First prompt", n=2, max_new_tokens=4)
    studio.rate(cs[0].id, 4)
    nxt = studio.next_prompt()
    assert nxt["text"] in ("Second prompt", "Third prompt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(StudioError, match="line 2"):
        studio.import_prompts(str(bad))
    assert "ok" not in studio.prompts()["text"].tolist()


def test_history_tab_reads_labels_in_words(studio):
    """The History tab's labels table: each label in words on its completions' ids, the prompt beside it, the
    critique text and reason tags as a note; no internal columns (session, idempotency key), which squeezed 18
    columns into letter-wide ones; replaced labels marked in the history view."""
    from rlhf_studio.studio.ui.history import readable_labels
    a, b, c = studio.generate("Name a fruit.", n=3, max_new_tokens=4, seed=0)
    studio.rate(a.id, 1)
    studio.rate(a.id, 4)                                   # replaces the 1
    studio.thumbs(b.id, up=False, tags=["off-topic"])
    studio.compare(a.id, b.id, "b")
    studio.compare(a.id, c.id, "both_bad")
    studio.rank([c.id, a.id, b.id])
    studio.critique(c.id, "Too short.", "Apple.")
    table = readable_labels(studio.feedback(), studio.prompts())
    assert list(table.columns) == ["id", "when", "kind", "criterion", "prompt", "label", "note", "annotator",
                                   "source"]
    by_kind = {k: g for k, g in table.groupby("kind")}
    assert by_kind["stars"]["label"].tolist() == [f"4 stars for #{a.id}"]
    assert by_kind["thumbs"]["label"].tolist() == [f"down for #{b.id}"]
    assert by_kind["thumbs"]["note"].tolist() == ["tags: off-topic"]
    assert sorted(by_kind["pairwise"]["label"]) == sorted([f"#{a.id} vs #{b.id}: #{b.id} wins",
                                                           f"#{a.id} vs #{c.id}: both bad"])
    assert by_kind["ranking"]["label"].tolist() == [f"#{c.id} > #{a.id} > #{b.id}"]
    assert by_kind["critique"]["note"].tolist() == ["Too short."]
    assert by_kind["rewrite"]["label"].str.startswith(f"#{c.id} rewritten as #").all()
    assert (table["prompt"] == f"#{a.prompt_id} Name a fruit.").all()
    history = readable_labels(studio.feedback(history=True), studio.prompts())
    stars = history[history["kind"] == "stars"].sort_values("id")
    assert stars["label"].tolist() == [f"1 star for #{a.id}", f"4 stars for #{a.id}"]
    assert stars["superseded"].tolist() == [True, False]
    from rlhf_studio.studio.ui.history import readable_completions
    comps = readable_completions(studio.completions())
    assert list(comps.columns) == ["id", "when", "prompt_id", "source", "policy", "tokens", "finish", "seed",
                                   "corrects", "text"]
    rewrite = comps[comps["corrects"] == c.id]
    assert rewrite["text"].tolist() == ["Apple."] and (comps["policy"] == "base").all()


def test_undo_and_withdraw_labels_refit_the_reward_model(studio):
    """A mislabel can be taken back: `undo` withdraws this person's newest label (again and again), `retract` a
    label by id; the label it had replaced is current again, and the fast reward tier refits without it."""
    from rlhf_studio.studio.ui.history import describe_withdrawal
    cs = studio.generate("Name a colour.", n=4, max_new_tokens=4, seed=0)
    a, b = cs[:2]
    for c, stars in zip(cs, (2, 5, 4, 3)):
        studio.rate(c.id, stars)
    studio.rate(a.id, 5)                                   # a slip: a should keep its 2
    versions = studio.reward_versions()

    def fitted_on_current_pairs() -> bool:     # the newest fast version saw exactly today's training pairs
        from rlhf_studio.studio.reward_service import _digest
        train = studio.store.preference_pairs().query("not heldout")
        keys = [f"{c}>{r}" for c, r in zip(train["chosen_id"], train["rejected_id"])]
        return studio.reward_versions()["config"].iloc[-1]["pairs_sha1"] == _digest(keys)
    assert fitted_on_current_pairs() and a.id in set(studio.store.preference_pairs()["chosen_id"])

    out = studio.undo()
    assert out["label"]["stars"] == 5 and out["restored_id"] is not None
    assert "2 stars" not in describe_withdrawal(out) and f"5 stars for #{a.id}" in describe_withdrawal(out)
    assert f"(#{out['restored_id']}) is current again" in describe_withdrawal(out)
    cur = studio.feedback().set_index("completion_id")["stars"].to_dict()
    assert cur == {c.id: s for c, s in zip(cs, (2, 5, 4, 3))}
    refit = studio.reward_versions()
    assert len(refit) == len(versions) + 1 and refit["id"].iloc[-1] > versions["id"].max()
    assert fitted_on_current_pairs() and a.id not in set(studio.store.preference_pairs()["chosen_id"])

    # withdrawing all but one pair leaves no fast model, rather than one fitted on withdrawn labels
    studio.undo(), studio.undo()
    assert len(studio.store.preference_pairs()) == 1
    with pytest.raises(StudioError, match="no reward model yet"):
        studio.score(a.id)
    studio.undo(), studio.undo()

    someone = studio.rate(b.id, 1, annotator="someone")
    with pytest.raises(StudioError, match="only withdraw your own"):
        studio.retract(someone, own_only=True)
    assert studio.retract(someone, "spam")["label"]["annotator"] == "someone"   # an owner may
    with pytest.raises(StudioError, match="Nothing to undo"):
        studio.undo()
    with pytest.raises(StudioError, match="already withdrawn"):
        studio.retract(someone)
    hist = studio.feedback(history=True)
    assert studio.feedback().empty and len(hist) == 6 and hist["retracted"].sum() == 6


def test_a_generation_stopped_early_is_saved(studio):
    """The Stop button: what was generated so far is kept, marked finish_reason "stop" (it was refused by the
    store, which lost the completions and left their prompt behind without them)."""
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3

    cs = studio.generate("Tell me a long story about a dragon.", n=2, max_new_tokens=200, seed=1, stop=stop)
    assert len(cs) == 2 and "stop" in {c.finish_reason for c in cs}
    assert all(c.completion_tokens < 200 for c in cs)
    stored = studio.completions(cs[0].prompt_id).sort_values("id")
    assert stored["finish_reason"].tolist() == [c.finish_reason for c in cs]
    assert stored["text"].tolist() == [c.text for c in cs]


def test_reward_training_refuses_settings_it_would_ignore(studio):
    """Misspelt or out-of-range reward settings trained a model with the defaults, recorded as if asked."""
    a, b, c = studio.generate("Name a fruit.", n=3, max_new_tokens=4, seed=0)
    studio.rank([a.id, b.id, c.id])
    versions = len(studio.reward_versions())
    for tier, config, pattern in [("fast", {"criterion": "helpfulness"}, "fast tier takes no settings"),
                                  ("deep", {"lerning_rate": 1e-3}, "unknown deep reward-model settings: lerning_rate"),
                                  ("deep", {"lr": float("nan")}, "lr must be a number > 0"),
                                  ("deep", {"epochs": -1}, "epochs must be a whole number >= 1"),
                                  ("deep", {"lora_layers": 0}, "lora_layers must be")]:
        with pytest.raises(StudioError, match=pattern):
            studio.train_reward_model(tier=tier, **config)
    assert len(studio.reward_versions()) == versions
