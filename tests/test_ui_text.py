"""Text shown by the tabs stays text: Markdown status lines and rubrics (studio.ui.common.md_text) and plotly labels
(studio.dashboards.plot_text), checked with a CommonMark renderer, no browser (the browser walk over every tab is
tests/faults/test_app_faults.py::test_hostile_text_is_shown_as_text_everywhere)."""
import html
import re

import pytest
from markdown_it import MarkdownIt

from rlhf_studio.studio.dashboards import plot_text
from rlhf_studio.studio.ui.common import fail, md_text, ok

HOSTILE = [
    "<script>window.__xss=1</script>",
    '<img src=x onerror="window.__xss=2">',
    "[a link](javascript:window.__xss=3) and ![x](http://198.51.100.7/beacon.png)",
    "[ref]\n\n[ref]: javascript:window.__xss=4",
    "<http://198.51.100.7/auto> **bold** _em_ `code` ~~strike~~ a | b",
    "# heading\n- item\n+ item\n1. first\n2) second\n> quote\n===",
    "back\\slash \\[not a link](x) <iframe src=\"javascript:1\"></iframe>",
]


def _render(md: str) -> str:
    return MarkdownIt("commonmark", {"html": True}).enable("strikethrough").enable("table").render(md)


@pytest.mark.parametrize("text", HOSTILE)
def test_markdown_shows_the_text_itself(text):
    out = _render(md_text(text))
    # one paragraph of text, nothing else: no link, image, emphasis, code, heading, list, quote or raw HTML
    tags = set(re.findall(r"<\s*([a-zA-Z0-9]+)", out))
    assert tags <= {"p", "br"}, (text, out)
    shown = html.unescape(re.sub(r"<[^>]+>", "", out)).strip()
    assert shown.split() == text.split(), (text, shown)


def test_status_messages_escape_what_they_quote():
    assert "<a" not in _render(ok("imported from [f](javascript:x).jsonl"))
    assert _render(fail("bad <img src=x onerror=y>")).count("<img") == 0
    assert "<strong>Error:</strong>" in _render(fail("x"))          # the prefix itself stays bold


def test_plot_text_is_shown_literally_by_plotly():
    # plotly reads <a href>, <b>, <br> ... as markup and shows entities as their characters
    for text in HOSTILE:
        assert "<" not in plot_text(text) and html.unescape(plot_text(text)) == text
