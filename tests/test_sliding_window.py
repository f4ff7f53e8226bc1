"""Windowed layers give back the KV blocks before their window while their sequences run: a model whose every
layer attends within a window (Mistral's sliding_window) in its one KV layer group, one that mixes local and
global layers (Gemma) in each windowed group, while its global group keeps everything. A long generation holds
only what it reads, and its tokens stay transformers' through prefix-cache hits, chunked prefills and
preemption."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import assert_all_blocks_free, run_to_completion
from tests.test_parity_random import random_prompts, reference_logprobs
from wde import LLMEngine, SamplingParams
from wde.core.kv_cache.layer_groups import KVLayerGroups, group_layers

WINDOW, BLOCK_SIZE = 32, 4
FLOAT32 = {"dtype": "float32"}  # transformers' precision on a GPU too (where "auto" would be bfloat16)


def greedy(num_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)


WINDOWED_SHAPES = ["mistral", "gemma2", "gemma3"]  # every layer windowed; local and global in turn; 5 to 1


@pytest.mark.parametrize("shape", WINDOWED_SHAPES)
@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_a_sequence_of_8_windows_holds_the_window_and_gives_transformers_tokens(tiny_model_dir, shape,
                                                                                  async_scheduling):
    folder = tiny_model_dir(shape, sliding_window=WINDOW)
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=400, block_size=BLOCK_SIZE,
                                        max_num_batched_tokens=16, async_scheduling=async_scheduling, **FLOAT32)
    windows = engine.kv_cache_manager.group_windows
    prompt = random_prompts([40])[0]  # prefilled in chunks of 16, across windows
    engine.add_request("long", prompt, greedy(8 * WINDOW))
    held, outputs = [], {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
        held += [engine.kv_cache_manager.blocks_held(seq) for seq in engine.scheduler.running]
    for group, window in enumerate(windows):
        most = max(blocks[group] for blocks in held)
        if window is None:
            assert most == -(-(len(prompt) + 8 * WINDOW - 1) // BLOCK_SIZE)  # a global group: every block
        else:
            assert most <= WINDOW // BLOCK_SIZE + 2, (group, most)
    assert_all_blocks_free(engine)
    tokens = outputs["long"].outputs[0].token_ids
    reference = reference_logprobs(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
                                   prompt, tokens)
    assert tokens == reference.argmax(-1).tolist()


# a cache smaller than the three sequences: Mistral's holds its windows of them, Gemma's all of their global blocks
TIGHT_CACHE = {"mistral": 16, "gemma2": 70, "gemma3": 120}


@pytest.mark.parametrize("shape", WINDOWED_SHAPES)
def test_prefix_hits_inside_the_window_and_preemption_keep_the_tokens(tiny_model_dir, shape):
    """A prompt shared past the window (its first blocks given back, still findable in the prefix cache), and
    a cache too small for all sequences at once, so that they are preempted and recomputed: the tokens of a
    roomy engine without either."""
    folder = tiny_model_dir(shape, sliding_window=WINDOW)
    shared = random_prompts([70], seed=4)[0]
    prompts = [shared + [5, 6], shared + [7], random_prompts([50], seed=5)[0]]

    def generate(**args) -> list[list[int]]:
        engine = LLMEngine.from_engine_args(model=folder, block_size=BLOCK_SIZE, max_num_batched_tokens=16, **args,
                                            **FLOAT32)
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
    assert_all_blocks_free(engine)
    tight, engine = generate(num_kv_blocks=TIGHT_CACHE[shape])
    assert tight == expected and engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(engine)


def test_layer_groups_follow_the_windows():
    # Gemma 2: local and global in turn, a group each, a block holding one layer of each group
    assert group_layers([8, None, 8, None], 1024, True) == KVLayerGroups((8, None), (0, 1, 0, 1), (0, 0, 1, 1), 2)
    # Gemma 3's 5 local to 1 global: the local layers cut into groups the size of the global one
    groups = group_layers(([8] * 5 + [None]) * 2, 1024, True)
    assert groups.windows == (8, 8, 8, 8, 8, None) and groups.layers_per_block == 2
    assert groups.group_of_layer == (0, 0, 1, 1, 2, 5, 2, 3, 3, 4, 4, 5)
    # one window for all (Mistral), a window as long as the model's (none), a prefill-only workflow: one group
    assert group_layers([8] * 3, 1024, True) == KVLayerGroups((8,), (0, 0, 0), (0, 1, 2), 3)
    assert group_layers([2048, None], 1024, True).windows == (None,)
    assert group_layers([8, None], 1024, False) == KVLayerGroups((None,), (0, 0), (0, 1), 2)


def test_a_model_with_global_layers_sizes_one_sequence_by_its_global_blocks(tiny_model_dir):
    """A sequence alone must fit: Gemma's global group holds all of it, its windowed group its window."""
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("gemma2", sliding_window=WINDOW), num_kv_blocks=100,
                                        block_size=BLOCK_SIZE, max_num_batched_tokens=16)
    manager = engine.kv_cache_manager
    assert manager.window is None and manager.group_windows == (WINDOW, None)
    # 100 blocks: 14 for the window (12 for its 32 tokens and a step of 16, two more), 86 global blocks of 4 tokens
    assert engine.request_processor.max_seq_len == 86 * BLOCK_SIZE
    mistral = LLMEngine.from_engine_args(model=tiny_model_dir("mistral", sliding_window=WINDOW), num_kv_blocks=100,
                                         block_size=BLOCK_SIZE, max_num_batched_tokens=16)
    assert mistral.kv_cache_manager.window == WINDOW
    assert mistral.request_processor.max_seq_len == mistral.config.model.max_model_len


def test_a_cached_prefix_longer_than_the_cache_leaves_room_once_its_window_passed(tiny_model_dir):
    """8 blocks of 4: the prompt's 8 blocks stay in the prefix cache; a longer prompt finds them all, gives back
    those before its window at admission and runs (it waited forever, with every block free)."""
    folder = tiny_model_dir("mistral", sliding_window=8)
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=8, block_size=BLOCK_SIZE,
                                        max_num_batched_tokens=8, enable_prefix_caching=True, **FLOAT32)
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


@pytest.mark.parametrize("shape", ["gemma2", "gemma3"])
def test_the_memory_profile_step_runs_over_every_layer_group(tiny_model_dir, shape):
    """The step a GPU worker runs to size its KV cache carries every group's tables (run here on the CPU)."""
    engine = LLMEngine.from_engine_args(model=tiny_model_dir(shape), num_kv_blocks=16, block_size=BLOCK_SIZE,
                                        max_num_batched_tokens=32, max_num_seqs=4)
    worker = engine.executor.worker
    assert worker.kv_layer_groups.num_groups > 1
    worker.profile_run()  # a scratch cache of its own, dropped after
    assert all(layer.kv_cache is None for layer in worker.kv_layers)


@pytest.mark.parametrize("shape", ["mistral", "gemma2"])
def test_a_window_shorter_than_a_block_with_prefix_hits(tiny_model_dir, shape):
    """A window of 1: the token before the first to compute reads no cached block, yet the hit keeps the block
    before it (its hash may still be cached); the same prompt twice gives the tokens of an engine without the
    prefix cache (an IndexError escaped step() here; found by the helper's attack)."""
    folder = tiny_model_dir(shape, sliding_window=1)
    prompt = random_prompts([20], seed=8)[0]

    def generate(**args) -> list[list[int]]:
        engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=100, block_size=BLOCK_SIZE,
                                            max_num_batched_tokens=16, **args, **FLOAT32)
        tokens = []
        for i in range(2):
            engine.add_request(str(i), prompt, greedy(6))
            tokens.append(run_to_completion(engine)[str(i)].outputs[0].token_ids)
        return tokens, engine
    expected, _ = generate()
    cached, engine = generate(enable_prefix_caching=True)
    assert cached == expected and engine.kv_cache_manager.prefix_cache_hit_rate > 0.3
