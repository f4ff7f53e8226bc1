"""SamplingParams through the whole engine: logprobs, prompt logprobs, n, seeds, min_tokens, stop tokens."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import run_to_completion
from tests.test_parity_random import random_prompts
from wde import LLMEngine, SamplingParams


@pytest.fixture(params=[True, False], ids=["async", "sync"])
def engine(tiny_model_dir, request):
    # a 24-token step budget splits the longer prompts into chunks
    return LLMEngine.from_engine_args(model=tiny_model_dir("qwen2"), num_kv_blocks=64, max_num_batched_tokens=24,
                                      async_scheduling=request.param)


def run(engine, prompts, params) -> list:
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params if isinstance(params, SamplingParams) else params[i])
    outputs = run_to_completion(engine)
    return [outputs[str(i)] for i in range(len(prompts))]


def test_prompt_logprobs_match_transformers_across_chunks(engine, tiny_model_dir):
    prompts = random_prompts([30, 7, 55], seed=4)
    outputs = run(engine, prompts, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3))
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2"), dtype=torch.float32)
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            reference = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
        entries = output.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        for position, entry in enumerate(entries[1:], 1):
            token = prompt[position]
            expected = reference[position - 1]
            assert abs(entry[token].logprob - expected[token].item()) < 1e-4
            assert entry[token].rank == int((expected > expected[token]).sum()) + 1
            top3 = expected.topk(3).indices.tolist()
            assert all(entry[t].rank == r for r, t in enumerate(top3, 1))


def test_logprobs_hold_the_sampled_token_and_the_top_k(engine):
    output = run(engine, [[5, 6, 7]], SamplingParams(temperature=1.0, seed=3, max_tokens=6, logprobs=4,
                                                     ignore_eos=True))[0].outputs[0]
    assert len(output.logprobs) == 6
    for token, entry in zip(output.token_ids, output.logprobs):
        assert token in entry and 4 <= len(entry) <= 5
        ranked = sorted((lp.rank, lp.logprob) for t, lp in entry.items() if lp.rank <= 4)
        assert [r for r, _ in ranked][:4] == [1, 2, 3, 4] and ranked == sorted(ranked, key=lambda x: -x[1])
    assert output.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(output.token_ids,
                                                                                       output.logprobs)))


def test_n_completions_differ_and_a_seed_reproduces_them(engine):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    first = run(engine, [[5, 6, 7]], params)[0]
    again = run(engine, [[5, 6, 7]], params)[0]
    ids = [c.token_ids for c in first.outputs]
    assert [c.index for c in first.outputs] == [0, 1, 2] and len({tuple(i) for i in ids}) == 3
    assert [c.token_ids for c in again.outputs] == ids


def test_unseeded_sampling_varies(engine):
    outputs = run(engine, [[5, 6, 7]] * 4, SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True))
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) > 1


def test_stop_token_ids_and_min_tokens(engine):
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    free = run(engine, [[9, 10, 11]], greedy)[0].outputs[0].token_ids
    stop_at = free[2]
    stopped = run(engine, [[9, 10, 11]], greedy.model_copy(update={"stop_token_ids": [stop_at]}))[0].outputs[0]
    assert stopped.token_ids == free[:free.index(stop_at) + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_at
    held = run(engine, [[9, 10, 11]], greedy.model_copy(update={"stop_token_ids": [stop_at], "min_tokens": 6})
               )[0].outputs[0]
    assert len(held.token_ids) >= 6 and stop_at not in held.token_ids[:6]


def test_a_batch_mixes_every_kind_of_params(engine):
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, seed=1, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.3,
                             max_tokens=5, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, repetition_penalty=2.0, max_tokens=5, ignore_eos=True)]
    outputs = run(engine, random_prompts([4, 9, 13, 6], seed=5), params)
    assert all(len(o.outputs[0].token_ids) == 5 for o in outputs)
    alone = run(engine, random_prompts([4], seed=5), params[0])[0]
    assert alone.outputs[0].token_ids == outputs[0].outputs[0].token_ids


def test_stop_token_outside_the_vocabulary_is_refused(engine):
    with pytest.raises(ValueError, match=r"stop_token_ids \[9999\] are outside the vocabulary"):
        engine.add_request("x", [5], SamplingParams(stop_token_ids=[9999]))
