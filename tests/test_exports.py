"""Exports (preference / unpaired / sft / raw; parquet, jsonl, csv) and imports (TRL pairs, rated completions)
on real DuckDB files through storage.Store; no model needed."""
from __future__ import annotations

import csv
import gzip
import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_studio.storage import InvalidInput, Store
from rlhf_studio.storage.io import export as q
from rlhf_studio.storage.io import rated
from rlhf_studio import StudioError
from rlhf_studio.studio.exports import export, import_preferences, import_rated


# ------------------------------------------------------------------------------------------------ fixtures
def _prompt(st: Store, text: str, answers: list[str]) -> tuple[int, list[int]]:
    pid = st.add_prompt(text)
    return pid, st.add_completions([{"prompt_id": pid, "text": a} for a in answers])


@pytest.fixture
def filled(fresh_store):
    """Every feedback kind, two annotators, a replaced label, a second criterion, ties and critiques."""
    st = fresh_store
    st.add_criterion("honesty", "Does not make things up")
    p1, c1 = _prompt(st, "Write a haiku about rain", ["rain falls", "=cmd|' /C calc'!A0", "-minus first", "ok"])
    p2, c2 = _prompt(st, "Explain DNS", ["DNS maps names", "@SUM(1)", "+plus", "\tTab start"])
    p3, c3 = _prompt(st, "Say hi", ["hi", "hello"])
    st.add_feedback(kind="stars", completion_id=c1[0], stars=2, annotator="ann")     # replaced below
    st.add_feedback(kind="stars", completion_id=c1[0], stars=5, annotator="ann")
    st.add_feedback(kind="stars", completion_id=c1[1], stars=1, annotator="ann")
    st.add_feedback(kind="stars", completion_id=c1[2], stars=3, annotator="ann")
    st.add_feedback(kind="stars", completion_id=c1[0], stars=4, annotator="bob")
    st.add_feedback(kind="stars", completion_id=c1[1], stars=2, annotator="bob")
    st.add_feedback(kind="thumbs", completion_id=c2[0], up=True, annotator="ann")
    st.add_feedback(kind="thumbs", completion_id=c2[1], up=False, tags=["incorrect"], annotator="ann")
    st.add_feedback(kind="thumbs", completion_id=c2[2], up=True, annotator="ann")
    st.add_feedback(kind="thumbs", completion_id=c2[2], up=False, annotator="bob")   # disputed: not SFT
    st.add_feedback(kind="pairwise", completion_id=c3[0], other_completion_id=c3[1], winner="b", annotator="ann")
    st.add_feedback(kind="pairwise", completion_id=c1[2], other_completion_id=c1[3], winner="tie", annotator="ann")
    st.add_feedback(kind="ranking", ranking=[c2[3], c2[0], c2[1]], annotator="bob")
    st.add_feedback(kind="critique", completion_id=c1[3], text="too short", annotator="ann")
    st.add_feedback(kind="stars", completion_id=c3[0], stars=5, criterion="honesty", annotator="ann")
    st.add_feedback(kind="stars", completion_id=c3[1], stars=1, criterion="honesty", annotator="ann")
    _, new = st.add_rewrite(c1[3], "A better haiku: rain on the roof", annotator="ann")
    return st, {"p": (p1, p2, p3), "c1": c1, "c2": c2, "c3": c3, "rewrite": new}


def _read(path: str, fmt: str) -> pd.DataFrame:
    if os.path.getsize(path) == 0:
        return pd.DataFrame()
    if fmt == "parquet":
        return pq.read_table(path).to_pandas()
    if fmt == "jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    return pd.read_csv(path, keep_default_na=False)


# ------------------------------------------------------------------------------------------------ preference
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_preference_export_is_the_pair_view_one_to_one(filled, tmp_path, fmt):
    st, ids = filled
    for criterion in ("overall", "honesty", {"overall": 1.0, "honesty": 2.0}):
        pairs = st.preference_pairs(criterion)
        path = str(tmp_path / f"pref.{fmt}")
        n = export(st, "preference", path, fmt, criterion=criterion)
        got = _read(path, fmt)
        assert n == len(pairs) == len(got) > 0
        keys = ["prompt_id", "chosen_id", "rejected_id", "kind", "feedback_id", "criterion", "annotator",
                "source", "pair_key", "heldout"]
        assert got[keys].astype(str).values.tolist() == pairs[keys].astype(str).values.tolist()
        assert got["margin"].tolist() == pytest.approx(pairs["margin"].tolist())
        texts = st.completions().set_index("id")["text"]
        prompts = st.prompts().set_index("id")["text"]
        for r in got.itertuples():
            assert r.chosen == texts[r.chosen_id] and r.rejected == texts[r.rejected_id]
            assert r.prompt == prompts[r.prompt_id]
    # the star pair carries the star difference as margin; ties, critiques give no row
    got = _read(str(tmp_path / f"pref.{fmt}"), fmt)
    assert set(got["kind"]) <= {"stars", "thumbs", "pairwise", "ranking", "rewrite"}


def test_preference_all_criteria_and_split(filled, tmp_path):
    st, _ = filled
    both = len(st.preference_pairs({"overall": 1.0, "honesty": 1.0}))
    assert export(st, "preference", str(tmp_path / "all.parquet"), criterion=None) == both
    train = export(st, "preference", str(tmp_path / "train.parquet"), split="train")
    test = export(st, "preference", str(tmp_path / "test.parquet"), split="test")
    pairs = st.preference_pairs()
    assert (train, test) == (int((~pairs["heldout"]).sum()), int(pairs["heldout"].sum()))
    export(st, "preference", str(tmp_path / "bare.parquet"), metadata=False)
    bare = pq.read_table(str(tmp_path / "bare.parquet"))
    assert bare.column_names == ["prompt", "chosen", "rejected", "margin"]


@pytest.mark.parametrize("fmt,builder", [("parquet", "parquet"), ("jsonl", "json")])
def test_exports_load_with_datasets(filled, tmp_path, fmt, builder):
    datasets = pytest.importorskip("datasets")  # a dev dependency
    st, _ = filled
    for kind in ("preference", "unpaired", "sft"):
        for conv in (False, True):
            path = str(tmp_path / f"{kind}-{conv}.{fmt}")
            n = export(st, kind, path, fmt, conversational=conv)
            ds = datasets.load_dataset(builder, data_files=path, split="train")
            assert len(ds) == n > 0
            cols = {"preference": ["prompt", "chosen", "rejected", "margin"], "unpaired": ["prompt", "completion",
                                                                                         "label"],
                    "sft": ["prompt", "completion"]}[kind]
            assert ds.column_names[:len(cols)] == cols
            row = ds[0]
            if conv:
                assert row["prompt"][0]["role"] == "user" and isinstance(row["prompt"][0]["content"], str)
                other = "chosen" if kind == "preference" else "completion"
                assert row[other] == [{"role": "assistant", "content": row[other][0]["content"]}]
            else:
                assert isinstance(row["prompt"], str)
            if kind == "unpaired":
                assert isinstance(row["label"], bool)


def test_conversational_splits_multi_turn_hh_prompts(fresh_store, tmp_path):
    st = fresh_store
    src = tmp_path / "conv.jsonl"
    rows = [{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Name a colour"}],
             "chosen": [{"role": "assistant", "content": "Blue"}],
             "rejected": [{"role": "assistant", "content": "No"}]},
            {"prompt": "Plain prompt", "chosen": "yes", "rejected": "no"}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert import_preferences(st, str(src), "trl") == 2
    out = str(tmp_path / "out.jsonl")
    export(st, "preference", out, "jsonl", conversational=True)
    got = [json.loads(line) for line in open(out)]
    by_chosen = {g["chosen"][0]["content"]: g for g in got}
    assert by_chosen["Blue"]["prompt"] == rows[0]["prompt"]
    assert by_chosen["yes"]["prompt"] == [{"role": "user", "content": "Plain prompt"}]
    # and back again: the conversational export imports into a fresh database with the same texts
    st2 = Store(tmp_path / "again.duckdb")
    try:
        assert import_preferences(st2, out, "trl") == 2
        a = sorted(map(tuple, q_pairs_text(st)))
        b = sorted(map(tuple, q_pairs_text(st2)))
        assert a == b
    finally:
        st2.close()


def q_pairs_text(st: Store) -> list[list[str]]:
    path = os.path.join(os.path.dirname(st.path), f"tmp-{os.getpid()}-{id(st)}.parquet")
    export(st, "preference", path, metadata=False)
    df = pq.read_table(path).to_pandas()
    os.remove(path)
    return df[["prompt", "chosen", "rejected"]].values.tolist()


def test_plain_roundtrip_through_trl_import(filled, tmp_path):
    st, _ = filled
    out = str(tmp_path / "pref.parquet")
    n = export(st, "preference", out)
    st2 = Store(tmp_path / "copy.duckdb")
    try:
        added = import_preferences(st2, out, "trl")
        # identical (prompt, chosen, rejected) rows are one pair in the importer
        assert added == len({tuple(r) for r in q_pairs_text(st)}) <= n
        assert sorted({tuple(r) for r in q_pairs_text(st2)}) == sorted({tuple(r) for r in q_pairs_text(st)})
        src = set(st2.completions()["source"])
        assert src == {"import:trl:pref.parquet"}
    finally:
        st2.close()


# ------------------------------------------------------------------------------------------------ unpaired / sft
def test_unpaired_labels(filled, tmp_path):
    st, ids = filled
    path = str(tmp_path / "u.parquet")
    export(st, "unpaired", path)
    df = pq.read_table(path).to_pandas()
    got = sorted((int(r.completion_id), r.annotator, bool(r.label)) for r in df.itertuples())
    c1, c2 = ids["c1"], ids["c2"]
    assert got == sorted([
        (c1[0], "ann", True),    # 5 stars (the replaced 2 stars does not count)
        (c1[1], "ann", False),   # 1 star
        (c1[0], "bob", True),    # 4 stars
        (c1[1], "bob", False),   # 2 stars; c1[2] with 3 stars is skipped
        (c2[0], "ann", True), (c2[1], "ann", False), (c2[2], "ann", True), (c2[2], "bob", False)])
    fc = st.feedback()
    expected = fc[((fc["kind"] == "thumbs") | ((fc["kind"] == "stars") & (fc["stars"] != 3)))
                  & (fc["criterion"] == "overall")]
    assert len(df) == len(expected)


def test_sft_rows(filled, tmp_path):
    st, ids = filled
    path = str(tmp_path / "s.jsonl")
    n = export(st, "sft", path, "jsonl")
    rows = [json.loads(line) for line in open(path)]
    assert n == len(rows)
    got = {r["completion_id"]: r for r in rows}
    c1, c2 = ids["c1"], ids["c2"]
    # 5 stars (c1[0]), thumbs-up (c2[0]), the rewrite; c2[2] has a thumbs-down by bob -> out
    assert set(got) == {c1[0], c2[0], ids["rewrite"]}
    assert got[ids["rewrite"]]["origin"] == "rewrite"
    assert got[ids["rewrite"]]["completion"] == "A better haiku: rain on the roof"
    assert got[c1[0]]["prompt"] == "Write a haiku about rain"
    # honesty: c3[0] has 5 stars there, and rewrites count on every criterion
    export(st, "sft", path, "jsonl", criterion="honesty")
    assert {json.loads(line)["completion_id"] for line in open(path)} == {ids["c3"][0], ids["rewrite"]}


# ------------------------------------------------------------------------------------------------ raw / csv
@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_raw_export_every_table(filled, tmp_path, fmt):
    st, _ = filled
    run = st.create_run("ppo", {"lr": 1e-4})
    st.add_adapter("a1", b"\x00\x01weights", {"r": 8}, "base/model", run_id=run)
    folder = tmp_path / "raw"
    n = export(st, "raw", str(folder), fmt)
    counts = st.stats()
    counts["schema_version"] = int(st.query("SELECT count(*) AS n FROM schema_version")["n"][0])
    assert n == sum(counts.values())
    files = sorted(os.listdir(folder))
    assert files == sorted(f"{t}.{fmt}" for t in q.RAW_TABLES)
    for t, c in counts.items():
        assert len(_read(str(folder / f"{t}.{fmt}"), fmt)) == c, t
    if fmt == "parquet":
        ad = pq.read_table(str(folder / "adapters.parquet")).to_pandas()
        assert bytes(ad["weights"][0]) == b"\x00\x01weights"
    if fmt == "jsonl":
        import base64
        ad = [json.loads(line) for line in open(folder / "adapters.jsonl")]
        assert base64.b64decode(ad[0]["weights"]) == b"\x00\x01weights"
        assert ad[0]["config"] == {"r": 8}


def test_csv_neutralises_formulas(filled, tmp_path):
    st, ids = filled
    path = str(tmp_path / "u.csv")
    export(st, "unpaired", path, "csv")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    texts = {r["completion"] for r in rows}
    assert "'=cmd|' /C calc'!A0" in texts and "'@SUM(1)" in texts and "'+plus" in texts
    assert "rain falls" in texts and not any(t and t[0] in "=+-@\t\r" for t in texts)
    assert {r["label"] for r in rows} == {"true", "false"}
    # numbers are not text: a negative margin / id stays a number
    path = str(tmp_path / "p.csv")
    export(st, "preference", path, "csv", conversational=True)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert all(float(r["margin"]) > 0 for r in rows)
    assert json.loads(rows[0]["prompt"])[0]["role"] == "user"
    raw = tmp_path / "raw"
    export(st, "raw", str(raw), "csv")
    with open(raw / "completions.csv", newline="", encoding="utf-8") as fh:
        comp = {r["text"] for r in csv.DictReader(fh)}
    assert "'-minus first" in comp and "'\tTab start" in comp


def test_export_errors_leave_nothing(filled, tmp_path):
    st, _ = filled
    with pytest.raises(StudioError, match="kind must be one of"):
        export(st, "everything", str(tmp_path / "x.parquet"))
    with pytest.raises(StudioError, match="format must be one of"):
        export(st, "sft", str(tmp_path / "x.xlsx"), "xlsx")
    with pytest.raises(StudioError, match="does not exist"):
        export(st, "sft", str(tmp_path / "missing" / "x.parquet"))
    with pytest.raises(StudioError, match="split"):
        export(st, "sft", str(tmp_path / "x.parquet"), split="train")
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".partial", ".parquet", ".xlsx"))]


def test_empty_database_exports_zero_rows(fresh_store, tmp_path):
    for kind in ("preference", "unpaired", "sft"):
        for fmt in ("parquet", "jsonl", "csv"):
            assert export(fresh_store, kind, str(tmp_path / f"{kind}.{fmt}"), fmt) == 0


# ------------------------------------------------------------------------------------------------ TRL import
def test_trl_import_malformed_changes_nothing(fresh_store, tmp_path):
    st = fresh_store
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p1", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "p2", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "p3", "chosen": "a"}) + "\n")
    before = st.stats()
    with pytest.raises(StudioError) as e:
        import_preferences(st, str(bad), "trl")
    assert "line 3" in str(e.value) and "'rejected'" in str(e.value) and "nothing was imported" in str(e.value)
    assert st.stats() == before
    table = pa.table({"prompt": ["p", "q"], "chosen": ["a", None], "rejected": ["b", "c"]})
    pq.write_table(table, str(tmp_path / "bad.parquet"))
    with pytest.raises(StudioError, match=r"row 2.*'chosen'"):
        import_preferences(st, str(tmp_path / "bad.parquet"), "trl")
    assert st.stats() == before


# ------------------------------------------------------------------------------------------------ rated import
def test_star_mapping():
    assert [rated.to_stars(s, "5") for s in (1, 1.49, 1.5, 2.5, 3, 4.5, 5)] == [1, 1, 2, 3, 3, 5, 5]
    assert [rated.to_stars(s, "10") for s in range(0, 11)] == [1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert rated.to_stars(7.5, "10") == 4  # 3.75 -> 4


def test_rated_import_jsonl(fresh_store, tmp_path):
    st = fresh_store
    path = tmp_path / "uf.jsonl"
    rows = [{"instruction": "Explain gravity", "completions": [
                {"response": "Mass attracts mass.", "overall_score": 9},
                {"response": "Magic.", "overall_score": 2},
                {"response": "Spacetime curvature.", "overall_score": 7.5}]},
            {"prompt": "Say hi", "completions": [{"text": "hi", "rating": 10}, {"text": "bye", "score": 3}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = import_rated(st, str(path))
    assert r["completions"] == r["labels"] == 5 and r["prompts"] == 2 and r["scale"] == "10"
    assert r["source"] == "import:uf.jsonl"
    comp = st.completions()[["id", "text", "source"]].rename(columns={"id": "cid", "text": "ctext",
                                                                      "source": "source_c"})
    fb = st.feedback(kind="stars").merge(comp, left_on="completion_id", right_on="cid")
    assert dict(zip(fb["ctext"], fb["stars"])) == {"Mass attracts mass.": 5, "Magic.": 1,
                                                  "Spacetime curvature.": 4, "hi": 5, "bye": 2}
    assert set(fb["annotator"]) == set(fb["source"]) == set(fb["source_c"]) == {"import:uf.jsonl"}
    assert set(st.prompts()["source"]) == {"import:uf.jsonl"}
    # stars within a prompt become pairs for the reward model (and the preference export)
    pairs = st.preference_pairs()
    assert len(pairs) == 3 + 1 and set(pairs["kind"]) == {"stars"}
    assert export(st, "preference", str(tmp_path / "p.parquet")) == 4
    # importing the same file again adds nothing
    again = import_rated(st, str(path))
    assert again["completions"] == 0 and again["skipped"] == 5
    assert len(st.feedback()) == 5


def test_rated_import_parquet_and_scale(fresh_store, tmp_path):
    st = fresh_store
    table = pa.table({"prompt": ["a", "b"],
                      "completions": [[{"text": "x", "score": 4.0}, {"text": "y", "score": 1.0}],
                                      [{"text": "z", "score": 5.0}]]})
    pq.write_table(table, str(tmp_path / "r.parquet"))
    r = import_rated(st, str(tmp_path / "r.parquet"))
    assert r["scale"] == "5" and r["labels"] == 3
    assert sorted(st.feedback()["stars"]) == [1, 4, 5]
    # the same numbers read as 0..10 when told so
    r = import_rated(fresh_store, str(tmp_path / "r.parquet"), scale="10", source="ten")
    assert r["source"] == "import:ten"
    assert sorted(st.feedback(annotator="import:ten")["stars"]) == [1, 2, 3]


@pytest.mark.parametrize("line,fix,needle", [
    (2, {"prompt": "p", "completions": [{"text": "a", "score": 1}, {"text": "b", "score": "high"}]},
     r"line 2: field 'completions\[2\]\.score' must be a number"),
    (2, {"prompt": "p", "completions": [{"text": "a", "score": 1}, {"score": 2}]},
     r"line 2: field 'completions\[2\]\.text' is missing"),
    (2, {"prompt": "p", "completions": []}, r"line 2: field 'completions' must be a non-empty list"),
    (2, {"completions": [{"text": "a", "score": 1}]}, r"line 2: field 'prompt' is missing"),
    (2, {"prompt": "p", "completions": [{"text": "a", "score": 11}]},
     r"line 2: field 'completions\[1\]\.score' is 11, outside the 0\.\.10 scale"),
    (2, "not json", r"line 2: not valid JSON"),
])
def test_rated_import_malformed_changes_nothing(fresh_store, tmp_path, line, fix, needle):
    st = fresh_store
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "ok prompt", "completions": [{"text": "fine", "score": 5}]}
    path.write_text(json.dumps(good) + "\n" + (fix if isinstance(fix, str) else json.dumps(fix)) + "\n")
    before = st.stats()
    with pytest.raises(StudioError, match=needle) as e:
        import_rated(st, str(path))
    assert "bad.jsonl" in str(e.value) and "nothing was imported" in str(e.value)
    assert st.stats() == before


def test_rated_import_gzip_and_unknown_criterion(fresh_store, tmp_path):
    path = tmp_path / "r.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps({"prompt": "p", "completions": [{"text": "a", "score": 2}, {"text": "b", "score": 4}]}))
    before = fresh_store.stats()
    with pytest.raises(StudioError, match="Unknown criterion"):
        import_rated(fresh_store, str(path), criterion="style")
    assert fresh_store.stats() == before
    assert import_rated(fresh_store, str(path))["labels"] == 2
    with pytest.raises(InvalidInput, match="scale"):
        rated.read_rated_file(str(path), scale="7")
