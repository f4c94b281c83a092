"""Case 7 through the API, and case 10's absurd requests: NUL bytes, text that is not valid Unicode, a 10 MB prompt,
absurd generation settings. Each: a clear message or the text stored exactly, nothing half written, and the next
request works. (Running out of memory while generating is in test_crash.py, in a fresh child process.)"""
import time

import pytest

from rlhf_studio import StudioError


def _counts(studio):
    st = studio.store.stats()
    return st["prompts"], st["completions"], st["feedback"]


def test_nul_bytes_are_refused_for_generation_and_stored_exactly_in_the_library(studio, tmp_path):
    before = _counts(studio)
    with pytest.raises(StudioError, match="NUL character"):
        studio.generate("tell me\x00a secret", n=1, max_new_tokens=4)
    assert _counts(studio) == before
    text = "a prompt with\x00a NUL byte and\u200b\u202e marks"
    [pid] = studio.add_prompts([text])
    assert studio.prompts().set_index("id").loc[pid, "text"] == text          # byte for byte
    f = tmp_path / "nul.jsonl"
    f.write_text('{"prompt": "from a file\\u0000with NUL"}\n')
    assert studio.import_prompts(str(f)) == 1
    assert "from a file\x00with NUL" in studio.prompts()["text"].tolist()


def test_text_that_is_not_valid_unicode_is_refused_by_the_library(studio):
    """A lone surrogate is what invalid UTF-8 becomes in Python (and what a browser can send in JSON)."""
    before = _counts(studio)
    with pytest.raises(StudioError, match="not valid Unicode"):
        studio.add_prompts(["broken \udc80 text"])
    cs = studio.generate("A fine prompt", n=1, max_new_tokens=3, seed=0)
    with pytest.raises(StudioError, match="not valid Unicode"):
        studio.critique(cs[0].id, "broken \ud800 critique")
    assert _counts(studio) == (before[0] + 1, before[1] + 1, before[2])       # only the fine prompt's rows


def test_text_that_is_not_valid_unicode_is_refused_for_generation(studio):
    before = _counts(studio)
    with pytest.raises(StudioError, match="not valid|invalid"):
        studio.generate("broken \udc80 prompt", n=1, max_new_tokens=3)
    assert _counts(studio) == before


def test_ten_megabyte_prompt_is_refused_and_nothing_written(studio):
    huge = ("Tell me a long story about the sea. " * 300_000)[: 10 * 1024 * 1024]
    before = _counts(studio)
    t0 = time.perf_counter()
    with pytest.raises(StudioError, match="context"):
        studio.generate(huge, n=2, max_new_tokens=16)
    print(f"10 MB prompt refused after {time.perf_counter() - t0:.1f} s")
    assert _counts(studio) == before
    assert studio.generate("And now a short one", n=1, max_new_tokens=3)[0].id   # the next request works


def test_absurd_generation_requests_are_refused(studio):
    before = _counts(studio)
    for kwargs, pattern in [(dict(n=10**6), "between 1 and"), (dict(n=0), "between 1 and"),
                            (dict(max_new_tokens=10**9), "max_new_tokens"), (dict(temperature=1e9), "temperature"),
                            (dict(top_p=0), "top_p"), (dict(max_new_tokens=8000), "context|max_new_tokens")]:
        with pytest.raises(StudioError, match=pattern):
            studio.generate("Say hi", **kwargs)
    assert _counts(studio) == before
