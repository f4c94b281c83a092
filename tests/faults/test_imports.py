"""Case 8: malformed import files. Nothing is inserted, and the message names the file and the line (JSONL/CSV)
or row (Parquet) that is wrong."""
import gzip
import json

import duckdb
import pytest

from rlhf_studio import StudioError


def _counts(studio):
    st = studio.store.stats()
    return st["prompts"], st["completions"], st["feedback"]


def _jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(r if isinstance(r, str) else json.dumps(r))
            fh.write("\n")
    return str(path)


def _parquet(path, rows_sql):
    con = duckdb.connect(":memory:")
    con.execute(f"COPY ({rows_sql}) TO '{path}' (FORMAT parquet)")
    con.close()
    return str(path)


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return str(path)


TRL_OK = {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}
HH_OK = {"chosen": "\n\nHuman: Say hi\n\nAssistant: Hi!", "rejected": "\n\nHuman: Say hi\n\nAssistant: No."}
RATED_OK = {"prompt": "Say hi", "completions": [{"text": "Hi!", "score": 5}, {"text": "No.", "score": 1}]}


def _cases(tmp):
    """(name, how to import, file, what the message must contain)."""
    p, t = "import_prompts", "import_preferences"
    return [
        ("prompts: bad JSON", p, _jsonl(tmp / "a.jsonl", [{"prompt": "ok 1"}, {"prompt": "ok 2"}, '{"prompt": "x"']),
         ["a.jsonl", "line 3", "JSON"]),
        ("prompts: wrong type", p, _jsonl(tmp / "b.jsonl", [{"prompt": "ok"}, {"prompt": 3}]), ["b.jsonl", "line 2"]),
        ("prompts: missing field", p, _jsonl(tmp / "c.jsonl", [{"prompt": "ok"}, {"prompt": "ok 2"}, {"title": "x"}]),
         ["c.jsonl", "line 3", "prompt"]),
        ("prompts: not UTF-8", p, _bytes(tmp / "d.txt", b"fine\nalso fine\n\xff\xfe broken\n"),
         ["d.txt", "line 3", "UTF-8"]),
        ("prompts: CSV without the column", p, _bytes(tmp / "e.csv", b"title,author\nx,y\n"), ["e.csv", "line 1"]),
        ("prompts: CSV ragged row", p, _bytes(tmp / "f.csv", b"prompt,tag\nok,1\nbad,2,3\n"), ["f.csv", "line 3"]),
        ("prompts: truncated parquet", p,
         _truncate(_parquet(tmp / "g.parquet", "SELECT 'prompt ' || i AS prompt FROM range(2000) t(i)")),
         ["g.parquet", "parquet"]),
        ("prompts: parquet null in row 3", p,
         _parquet(tmp / "h.parquet", "SELECT * FROM (VALUES ('a'), ('b'), (NULL), ('d')) v(prompt)"),
         ["h.parquet", "row 3"]),
        ("trl: missing field", (t, "trl"), _jsonl(tmp / "i.jsonl", [TRL_OK, {"prompt": "x", "chosen": "y"}]),
         ["i.jsonl", "line 2", "rejected"]),
        ("trl: wrong type", (t, "trl"), _jsonl(tmp / "j.jsonl", [TRL_OK, TRL_OK, {**TRL_OK, "chosen": 5}]),
         ["j.jsonl", "line 3", "chosen"]),
        ("trl: truncated parquet", (t, "trl"),
         _truncate(_parquet(tmp / "k.parquet", "SELECT 'p' || i AS prompt, 'c' || i AS chosen, 'r' || i AS rejected "
                                               "FROM range(2000) t(i)")), ["k.parquet", "Parquet"]),
        ("hh: bad JSON in a gzip file", (t, "hh"), _gz(tmp / "l.jsonl.gz", [json.dumps(HH_OK), "{oops"]),
         ["l.jsonl.gz", "line 2"]),
        ("hh: no shared prompt", (t, "hh"),
         _jsonl(tmp / "m.jsonl", [HH_OK, {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "totally else"}]),
         ["m.jsonl", "line 2"]),
        ("rated: score not a number", "import_rated",
         _jsonl(tmp / "n.jsonl", [RATED_OK, {"prompt": "q", "completions": [{"text": "t", "score": "high"}]}]),
         ["n.jsonl", "line 2", "completions[1].score"]),
        ("rated: missing completions", "import_rated", _jsonl(tmp / "o.jsonl", [RATED_OK, {"prompt": "q"}]),
         ["o.jsonl", "line 2", "completions"]),
        ("rated: score off the scale", "import_rated",
         _jsonl(tmp / "p.jsonl", [RATED_OK, {"prompt": "q", "completions": [{"text": "t", "score": 42}]}]),
         ["p.jsonl", "line 2", "42"]),
        ("rated: truncated parquet", "import_rated",
         _truncate(_parquet(tmp / "q.parquet", "SELECT 'p' || i AS prompt, [{'text': 'a' || i, 'score': 3}] AS "
                                               "completions FROM range(2000) t(i)")), ["q.parquet", "parquet"]),
        # a lone surrogate (a "\ud800" escape, seen in scraped JSON): a message, not a UnicodeEncodeError
        ("prompts: lone surrogate", p, _jsonl(tmp / "r.jsonl", [{"prompt": "ok"}, '{"prompt": "x\\ud800"}']),
         ["r.jsonl", "line 2", "not valid Unicode"]),
        ("trl: lone surrogate", (t, "trl"), _jsonl(tmp / "u.jsonl", [TRL_OK, '{"prompt": "p", "chosen": "c\\ud800", '
                                                                              '"rejected": "r"}']),
         ["u.jsonl", "Pair 2", "chosen", "not valid Unicode"]),
        ("rated: lone surrogate", "import_rated",
         _jsonl(tmp / "v.jsonl", [RATED_OK, '{"prompt": "q", "completions": [{"text": "t\\udc00", "score": 3}]}']),
         ["v.jsonl", "line 2", "not valid Unicode"]),
    ]


def _bytes(path, data):
    path.write_bytes(data)
    return str(path)


def _gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return str(path)


def _run(studio, how, path):
    if isinstance(how, tuple):
        return getattr(studio, how[0])(path, format=how[1])
    return getattr(studio, how)(path)


def test_malformed_files_insert_nothing_and_name_the_line(studio, tmp_path):
    studio.add_prompts(["already here"])
    before = _counts(studio)
    problems = []
    for name, how, path, must in _cases(tmp_path):
        try:
            _run(studio, how, path)
            problems.append(f"{name}: accepted")
            continue
        except StudioError as e:
            msg = str(e)
        except Exception as e:  # noqa: BLE001 - anything else is a crash, not a clear message
            problems.append(f"{name}: {type(e).__name__}: {e}")
            continue
        missing = [m for m in must if m.lower() not in msg.lower()]
        if missing:
            problems.append(f"{name}: message {msg!r} lacks {missing}")
        if _counts(studio) != before:
            problems.append(f"{name}: rows were inserted")
    assert not problems, "\n".join(problems)
    # the same kinds of files, well formed, import fine afterwards (the studio is still usable)
    assert studio.import_prompts(_jsonl(tmp_path / "ok.jsonl", [{"prompt": "ok 1"}, {"prompt": "ok 2"}])) == 2
    assert studio.import_preferences(_jsonl(tmp_path / "ok_trl.jsonl", [TRL_OK]), format="trl") == 1
    assert studio.import_rated(_jsonl(tmp_path / "ok_rated.jsonl", [RATED_OK]))["labels"] == 2


def test_huge_file_with_one_bad_line_at_the_end(studio, tmp_path):
    """200,000 prompts (about 8 MB) and a broken last line: nothing from the first 200,000 is kept."""
    path = tmp_path / "huge.jsonl"
    n = 200_000
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"Prompt number {i}: explain something interesting, please."}) + "\n")
        fh.write('{"prompt": ' + "\n")
    before = _counts(studio)
    with pytest.raises(StudioError, match=f"huge.jsonl, line {n + 1}"):
        studio.import_prompts(str(path))
    assert _counts(studio) == before
    # without the broken line the whole file goes in, in one transaction
    data = open(path).read().splitlines()[:-1]
    open(path, "w").write("\n".join(data) + "\n")
    assert studio.import_prompts(str(path)) == n
    assert _counts(studio)[0] == before[0] + n
