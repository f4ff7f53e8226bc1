"""Incremental text, stop strings across token boundaries, and what streamed outputs carry.

The output processor is fed a fixed token stream from the real SmolLM2 tokenizer: a text whose emoji and CJK
characters are split over several byte-level tokens.
"""
import pytest

from wde.core.config import EngineArgs, EngineConfig
from wde.core.request import Request
from wde.core.sampling.sampler import SamplerOutput
from wde.core.sampling.sampling_params import RequestOutputKind, SamplingParams
from wde.core.tokenizer import HFTokenizer
from wde.workflows.decoding.output_processor import DecodingOutputProcessor
from wde.workflows.decoding.scheduler import ScheduledSequence, SchedulerOutput
from wde.workflows.decoding.sequence import Sequence, SequenceGroup

TEXT = "Grüße aus Köln 😀 — 日本語 ok.\n\nThe end"


@pytest.fixture(scope="module")
def processor() -> DecodingOutputProcessor:
    config = EngineConfig.from_args(EngineArgs())
    return DecodingOutputProcessor(config, HFTokenizer(config))


def stream(processor, params: SamplingParams, text: str = TEXT) -> tuple[Sequence, list]:
    """Feed the tokens of `text` one step at a time; return the sequence and the RequestOutput of each step."""
    token_ids = processor.tokenizer.encode(text, add_special_tokens=False)
    prompt = [1, 2, 3]
    group = SequenceGroup(Request("r", None, prompt, params, 0.0), prompt)
    seq = Sequence(group, 0, list(prompt), len(prompt), max_output_tokens=len(token_ids))
    group.sequences = [seq]
    outputs = []
    for token in token_ids:
        if seq.is_finished:
            break
        step = SchedulerOutput([ScheduledSequence(seq, seq.num_tokens - 1, 1, True)])
        outputs.extend(processor(step, SamplerOutput([token])))
    return seq, outputs


def test_text_grows_without_broken_characters(processor):
    seq, outputs = stream(processor, SamplingParams(max_tokens=None))
    texts = [o.outputs[0].text for o in outputs]
    assert texts[-1] == TEXT
    assert all("\ufffd" not in text for text in texts)
    assert all(a == b[:len(a)] for a, b in zip(texts, texts[1:]))  # cumulative: each is a prefix of the next


@pytest.mark.parametrize("stop,include,expected", [
    ("😀 —", False, "Grüße aus Köln "),  # the emoji is two tokens, the stop string four
    ("😀 —", True, "Grüße aus Köln 😀 —"),
    ("ok.\n\nThe", False, "Grüße aus Köln 😀 — 日本語 "),
    ("öln", False, "Grüße aus K"),
])
def test_stop_strings_spanning_tokens(processor, stop, include, expected):
    seq, outputs = stream(processor, SamplingParams(max_tokens=None, stop=[stop, "never"],
                                                    include_stop_str_in_output=include))
    assert seq.text == expected and outputs[-1].outputs[0].text == expected
    assert seq.finish_reason == "stop" and seq.stop_reason == stop


def test_the_earliest_stop_string_wins(processor):
    seq, _ = stream(processor, SamplingParams(max_tokens=None, stop=["The end", "Köln"]))
    assert seq.text == "Grüße aus " and seq.stop_reason == "Köln"


def test_deltas_add_up_to_the_text_and_never_show_a_stop_string_prefix(processor):
    params = SamplingParams(max_tokens=None, stop=["\n\nThe"], output_kind=RequestOutputKind.DELTA)
    seq, outputs = stream(processor, params)
    deltas = [o.outputs[0].text for o in outputs]
    assert "".join(deltas) == "Grüße aus Köln 😀 — 日本語 ok."
    assert not any("\n" in d for d in deltas)  # the held-back "\n" never went out before the stop matched
    assert sum(len(o.outputs[0].token_ids) for o in outputs) == seq.num_output_tokens


def test_final_only_gives_one_output(processor):
    _, outputs = stream(processor, SamplingParams(max_tokens=None, output_kind=RequestOutputKind.FINAL_ONLY))
    assert len(outputs) == 1 and outputs[0].finished and outputs[0].outputs[0].text == TEXT


def test_detokenize_false_gives_ids_only(processor):
    seq, outputs = stream(processor, SamplingParams(max_tokens=None, detokenize=False))
    assert outputs[-1].outputs[0].text == "" and len(outputs[-1].outputs[0].token_ids) == seq.num_output_tokens
