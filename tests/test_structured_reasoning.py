"""Structured outputs of a reasoning model (reasoning_parser): its <think>...</think> is free, the constraint
holds the answer after it. A tiny model over a byte-level vocabulary with <think> and </think> as tokens; a
bias on the logits scripts what it wants to write, the constraint decides what it may."""
import re
import shutil

import pytest
import torch

from tests.conftest import assert_all_blocks_free
from tests.test_structured_outputs import write_byte_level_tokenizer_with_a_split_character
from wde import LLM, SamplingParams
from wde.workflows.decoding.after_reasoning import AfterReasoning, ReasoningTokens

DIGITS = {"regex": "[0-9]{3}"}


@pytest.fixture(scope="module")
def reasoning_model(tiny_model_dir, tmp_path_factory) -> tuple[str, dict[str, int]]:
    from transformers import AutoTokenizer
    folder = shutil.copytree(tiny_model_dir("qwen3"), tmp_path_factory.mktemp("reasoning") / "model")
    vocab = write_byte_level_tokenizer_with_a_split_character(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.save_pretrained(folder)
    return str(folder), {**vocab, "<think>": len(vocab), "</think>": len(vocab) + 1}


def scripted(llm: LLM, wanted: list[int]) -> None:
    """The model's logits favour wanted[i] by far at the i-th output token of the (only) request."""
    model, steps = llm.engine.executor.worker.model, []
    compute_logits = model.compute_logits

    def biased(hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        logits = compute_logits(hidden, gather)
        if len(steps) < len(wanted):
            logits[:, wanted[len(steps)]] += 1000.0
        steps.append(None)
        return logits
    model.compute_logits = biased


def generate(folder: str, prompt: list[int], wanted: list[int], **engine_args):
    llm = LLM(model=folder, num_kv_blocks=64, **engine_args)
    scripted(llm, wanted)
    output = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, structured_outputs=DIGITS),
                          use_tqdm=False)[0]
    assert output.error is None, output.error
    assert_all_blocks_free(llm.engine)
    llm.close()
    return output.outputs[0]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_reasoning_model_thinks_freely_then_answers_under_the_constraint(reasoning_model, async_scheduling):
    folder, vocab = reasoning_model
    think, end = vocab["<think>"], vocab["</think>"]
    letters = [vocab[c] for c in "abc"]
    completion = generate(folder, [5, 6, 7], [think, *letters, end, vocab["x"]], reasoning_parser="qwen3",
                          async_scheduling=async_scheduling)
    assert completion.token_ids[:5] == [think, *letters, end]  # the letters: nothing constrains the reasoning
    assert completion.token_ids[-1] == 1 and completion.finish_reason == "stop"  # EOS: the constraint is complete
    assert re.fullmatch("<think>abc</think>[0-9]{3}", completion.text)  # not the x the model wanted next


def test_a_prompt_that_opens_the_reasoning_starts_free_and_one_that_closed_it_starts_constrained(reasoning_model):
    folder, vocab = reasoning_model
    think, end = vocab["<think>"], vocab["</think>"]
    opened = generate(folder, [5, think, 6], [vocab["q"], end], reasoning_parser="qwen3")
    assert opened.token_ids[:2] == [vocab["q"], end]
    assert re.fullmatch("q</think>[0-9]{3}", opened.text)
    closed = generate(folder, [5, think, 6, end], [vocab["q"], think], reasoning_parser="qwen3")
    assert re.fullmatch("[0-9]{3}", closed.text)  # neither the letter nor a second <think>


def test_without_a_reasoning_parser_the_constraint_holds_from_the_first_token(reasoning_model):
    folder, vocab = reasoning_model
    completion = generate(folder, [5, 6, 7], [vocab["<think>"], vocab["a"]])
    assert re.fullmatch("[0-9]{3}", completion.text)


def test_a_reasoning_parser_needs_its_tags_as_tokens(tiny_model_dir):
    with pytest.raises(ValueError, match="vocabulary has no <think> or </think> token"):
        LLM(model=tiny_model_dir("qwen3"), num_kv_blocks=16, reasoning_parser="qwen3")


class Matcher:
    """Takes the tokens of "12" and then stops (3); refuses the rest."""

    def __init__(self):
        self.taken = []

    def accept_token(self, token: int) -> bool:
        if token in (1, 2, 3) and token == len(self.taken) + 1:
            self.taken.append(token)
            return True
        return False

    def is_terminated(self) -> bool:
        return self.taken == [1, 2, 3]

    def is_completed(self) -> bool:
        return len(self.taken) >= 2


def test_the_gate_takes_the_reasoning_and_hands_the_rest_to_the_constraint():
    tokens = ReasoningTokens(start=8, end=9)
    assert tokens.open_in([1, 8, 5]) and not tokens.open_in([8, 5, 9, 2]) and not tokens.open_in([1, 2])
    gate = AfterReasoning(Matcher(), tokens, thinking=False)
    assert gate.mask_parts()[1] == 8  # the first token may open the reasoning
    assert not gate.accept_token(5)  # refused by the constraint (a runner-up comes next): still may open
    assert gate.accept_token(8) and gate.mask_parts() == (None, None)  # reasoning: every token allowed
    assert gate.accept_token(5) and gate.accept_token(8) and not gate.is_terminated()
    assert gate.accept_token(9) and gate.mask_parts() == (gate.matcher, None)  # the constraint from here on
    assert not gate.accept_token(8) and gate.accept_token(1) and gate.accept_token(2) and gate.is_completed()
    assert gate.accept_token(3) and gate.is_terminated()
    straight = AfterReasoning(Matcher(), tokens, thinking=False)
    assert straight.accept_token(1) and straight.mask_parts() == (straight.matcher, None)  # no reasoning now
    assert not straight.accept_token(8)
