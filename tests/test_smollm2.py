"""The embedded default model, SmolLM2-135M-Instruct (.gguf), against transformers reading the same file."""
import pytest
import torch

from tests.conftest import assert_all_blocks_free
from wde import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Hi",
    "Write a haiku about the sea.",
    "List three prime numbers greater than ten, separated by commas:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Water boils at a temperature of",
    "Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker who had "
    "never once left the village. One morning, a stranger knocked on his door and",
    "Translate to French: I would like a cup of coffee, please.",
]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def reference_ids(hf_smollm2) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, generated one prompt at a time (no padding)."""
    model, tokenizer = hf_smollm2
    outputs = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        outputs.append(generated[0, ids.shape[1]:].tolist())
    return outputs


@pytest.mark.parametrize("max_num_seqs,async_scheduling", [(8, True), (3, True), (3, False)],
                         ids=["8-seqs-async", "3-seqs-async", "3-seqs-sync"])
def test_greedy_ids_match_transformers(reference_ids, hf_smollm2, max_num_seqs, async_scheduling):
    llm = LLM(max_num_seqs=max_num_seqs, num_kv_blocks=64, async_scheduling=async_scheduling)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    _, tokenizer = hf_smollm2
    for prompt, output, expected in zip(PROMPTS, outputs, reference_ids):
        assert output.prompt == prompt
        assert output.prompt_token_ids == tokenizer(prompt).input_ids
        assert output.outputs[0].token_ids == expected, f"{prompt!r} diverged from transformers"
        assert output.outputs[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert "Paris" in outputs[0].outputs[0].text
    assert_all_blocks_free(llm.engine)


def test_chat_applies_the_models_template(hf_smollm2):
    _, tokenizer = hf_smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    llm = LLM(num_kv_blocks=32)
    output = llm.chat(messages, SamplingParams(temperature=0, max_tokens=24))[0]
    expected_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
    assert output.prompt_token_ids == list(expected_prompt)
    assert "Paris" in output.outputs[0].text
    assert output.outputs[0].finish_reason in ("stop", "length")
    assert_all_blocks_free(llm.engine)
