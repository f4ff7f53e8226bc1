"""Splitting <think> reasoning from the answer, whole and as a stream cut anywhere."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import fuzz_settings
from wde.entrypoints.openai.reasoning import ReasoningSplitter, split_reasoning

CASES = [
    ("<think>\nthe sky scatters blue\n</think>\n\nBlue.", ("\nthe sky scatters blue\n", "Blue.")),
    ("the template opened it</think>The answer", ("the template opened it", "The answer")),
    ("no reasoning at all", (None, "no reasoning at all")),
    ("<think>never closed", ("never closed", "")),
    ("a < b and <thin", (None, "a < b and <thin")),
    ("", (None, "")),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_a_whole_answer_splits(text, expected):
    assert split_reasoning(text) == expected


@fuzz_settings(200)
@given(st.sampled_from(CASES), st.lists(st.integers(0, 60), max_size=8))
def test_a_stream_cut_anywhere_gives_the_whole_answers_split(case, cuts):
    text, (reasoning, content) = case
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0] + points, points + [len(text)])]
    splitter, got_reasoning, got_content = ReasoningSplitter(), "", ""
    for piece in pieces:
        r, c = splitter.feed(piece)
        got_reasoning, got_content = got_reasoning + r, got_content + c
    r, c = splitter.finish()
    assert (got_reasoning + r or None, got_content + c) == (reasoning, content)
