"""A model whose every layer attends within a window (Mistral's sliding_window) gives back the KV blocks before
the window while its sequences run: a long generation holds only what it reads, and its tokens stay
transformers' through prefix-cache hits, chunked prefills and preemption."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import assert_all_blocks_free, run_to_completion
from tests.test_parity_random import random_prompts, reference_logprobs
from wde import LLMEngine, SamplingParams

WINDOW, BLOCK_SIZE = 32, 4


def greedy(num_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_a_sequence_of_8_windows_holds_the_window_and_gives_transformers_tokens(tiny_model_dir, async_scheduling):
    folder = tiny_model_dir("mistral", sliding_window=WINDOW)
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=200, block_size=BLOCK_SIZE,
                                        max_num_batched_tokens=16, async_scheduling=async_scheduling)
    prompt = random_prompts([40])[0]  # prefilled in chunks of 16, across windows
    engine.add_request("long", prompt, greedy(8 * WINDOW))
    held, outputs = [], {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
        held += [len(s.block_table) - s.num_freed_blocks for s in engine.scheduler.running]
    assert max(held) <= WINDOW // BLOCK_SIZE + 2, max(held)
    assert_all_blocks_free(engine)
    tokens = outputs["long"].outputs[0].token_ids
    reference = reference_logprobs(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
                                   prompt, tokens)
    assert tokens == reference.argmax(-1).tolist()


def test_prefix_hits_inside_the_window_and_preemption_keep_the_tokens(tiny_model_dir):
    """A prompt shared past the window (its first blocks given back, still findable in the prefix cache), and
    a cache smaller than one sequence, so that they are preempted and recomputed: the tokens of a roomy engine
    without either."""
    folder = tiny_model_dir("mistral", sliding_window=WINDOW)
    shared = random_prompts([70], seed=4)[0]
    prompts = [shared + [5, 6], shared + [7], random_prompts([50], seed=5)[0]]

    def generate(**args) -> list[list[int]]:
        engine = LLMEngine.from_engine_args(model=folder, block_size=BLOCK_SIZE, max_num_batched_tokens=16, **args)
        engine.add_request("0", prompts[0], greedy(60))
        for _ in range(30):  # the first is well past the window of the shared prompt when the others come
            engine.step()
        for i, prompt in enumerate(prompts[1:], 1):
            engine.add_request(str(i), prompt, greedy(60))
        outputs = run_to_completion(engine)
        return [outputs[str(i)].outputs[0].token_ids for i in range(len(prompts))], engine

    expected, _ = generate(num_kv_blocks=400)
    cached, engine = generate(num_kv_blocks=400, enable_prefix_caching=True)
    assert cached == expected and engine.kv_cache_manager.prefix_cache_hit_rate > 0.3
    # 16 blocks, 64 tokens: less than one of these sequences, more than its window and a step's tokens
    tight, engine = generate(num_kv_blocks=16)
    assert tight == expected and engine.scheduler.num_preemptions > 0


def test_a_model_with_global_layers_keeps_every_block(tiny_model_dir):
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("gemma2"), num_kv_blocks=100, block_size=BLOCK_SIZE)
    assert engine.kv_cache_manager.window is None  # its full-attention layers read the whole sequence
    assert LLMEngine.from_engine_args(model=tiny_model_dir("mistral", sliding_window=WINDOW), num_kv_blocks=100,
                                      block_size=BLOCK_SIZE).kv_cache_manager.window == WINDOW


def test_a_cached_prefix_longer_than_the_cache_leaves_room_once_its_window_passed(tiny_model_dir):
    """8 blocks of 4: the prompt's 8 blocks stay in the prefix cache; a longer prompt finds them all, gives back
    those before its window at admission and runs (it waited forever, with every block free)."""
    folder = tiny_model_dir("mistral", sliding_window=8)
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=8, block_size=BLOCK_SIZE,
                                        max_num_batched_tokens=8, enable_prefix_caching=True)
    prompt = random_prompts([40], seed=6)[0]
    engine.add_request("first", prompt[:32], greedy(1))
    run_to_completion(engine)
    engine.add_request("longer", prompt, greedy(4))
    for _ in range(50):
        finished = [o for o in engine.step() if o.finished]
        if finished:
            break
    assert finished and finished[0].error is None and finished[0].num_cached_tokens == 32
    reference = reference_logprobs(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
                                   prompt, finished[0].outputs[0].token_ids)
    assert finished[0].outputs[0].token_ids == reference.argmax(-1).tolist()
    assert_all_blocks_free(engine)


def test_a_window_of_no_tokens_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="sliding_window=0: a window holds at least 1 token"):
        LLMEngine.from_engine_args(model=tiny_model_dir("mistral", sliding_window=0), num_kv_blocks=16)
