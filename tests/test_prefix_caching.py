"""Prefix caching: shared prompt starts are computed once, shared by reference count, evicted LRU."""
import random

from tests.conftest import run_to_completion
from tests.test_parity_random import random_prompts
from wde import LLMEngine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def engine_for(folder: str, **args) -> LLMEngine:
    return LLMEngine.from_engine_args(model=folder, max_model_len=1024, **{"num_kv_blocks": 96, **args})


def generate(engine: LLMEngine, request_id: str, prompt: list[int], params=GREEDY):
    engine.add_request(request_id, prompt, params)
    return run_to_completion(engine)[request_id]


def test_second_request_computes_only_its_suffix(tiny_model_dir):
    folder = tiny_model_dir("qwen3")
    shared = random_prompts([512], seed=6)[0]
    first, second = shared + random_prompts([20], seed=7)[0], shared + random_prompts([30], seed=8)[0]
    engine = engine_for(folder, enable_prefix_caching=True)
    out_first = generate(engine, "first", first)
    before = engine.get_stats().num_prompt_tokens
    out_second = generate(engine, "second", second)
    assert engine.get_stats().num_prompt_tokens - before == 30  # 512 shared tokens = 32 cached blocks of 16
    assert out_second.num_cached_tokens == 512 and out_first.num_cached_tokens == 0
    plain = engine_for(folder)
    assert out_second.outputs[0].token_ids == generate(plain, "second", second).outputs[0].token_ids
    assert out_first.outputs[0].token_ids == generate(plain, "first", first).outputs[0].token_ids
    assert 0.4 < engine.get_stats().prefix_cache_hit_rate < 0.5  # 512 of 532 + 542 tokens looked up


def test_a_fully_cached_prompt_still_computes_its_last_token(tiny_model_dir):
    engine = engine_for(tiny_model_dir("qwen3"), enable_prefix_caching=True)
    prompt = random_prompts([64], seed=9)[0]  # exactly 4 blocks
    first = generate(engine, "a", prompt)
    again = generate(engine, "b", prompt)
    assert again.num_cached_tokens == 48 and again.outputs[0].token_ids == first.outputs[0].token_ids


def test_blocks_are_shared_while_both_requests_run(tiny_model_dir):
    engine = engine_for(tiny_model_dir("qwen3"), enable_prefix_caching=True)
    shared = random_prompts([48], seed=10)[0]
    engine.add_request("a", shared + [5], GREEDY)
    engine.step()  # "a" fills three blocks of the shared prefix
    engine.add_request("b", shared + [6], GREEDY)
    engine.step()
    seqs = {seq.group.request_id: seq for seq in engine.scheduler.running}
    assert seqs["a"].block_table[:3] == seqs["b"].block_table[:3]
    allocator = engine.kv_cache_manager.allocator
    assert all(allocator.ref_counts[b] == 2 for b in seqs["a"].block_table[:3])
    run_to_completion(engine)


def test_least_recently_used_cached_blocks_are_evicted_only_when_needed(tiny_model_dir):
    engine = engine_for(tiny_model_dir("qwen3"), enable_prefix_caching=True, num_kv_blocks=12)
    old, recent = random_prompts([64, 64], seed=11)
    generate(engine, "old", old)  # 4 full prompt blocks stay cached after it finishes
    generate(engine, "recent", recent)
    assert engine.kv_cache_manager.allocator.num_cached >= 8
    # a 3-block request fits in the free, uncached blocks: nothing cached is evicted
    generate(engine, "small", random_prompts([40], seed=12)[0])
    assert generate(engine, "old-again", old).num_cached_tokens == 48
    # a large request must evict; the least recently used prefix ("recent", not re-read since) goes first
    generate(engine, "large", random_prompts([120], seed=13)[0])
    assert generate(engine, "old-3", old).num_cached_tokens == 48
    assert generate(engine, "recent-again", recent).num_cached_tokens < 48


def test_prompt_logprobs_requests_do_not_use_the_cache(tiny_model_dir):
    engine = engine_for(tiny_model_dir("qwen3"), enable_prefix_caching=True)
    prompt = random_prompts([40], seed=14)[0]
    generate(engine, "warm", prompt)
    out = generate(engine, "logprobs", prompt, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1))
    assert out.num_cached_tokens == 0 and len(out.prompt_logprobs) == 40


def test_shared_system_prompt_over_many_requests(tiny_model_dir):
    folder = tiny_model_dir("llama")
    system = random_prompts([100], seed=15)[0]
    rng = random.Random(16)
    prompts = [system + random_prompts([rng.randint(1, 30)], seed=100 + i)[0] for i in range(24)]
    cached = engine_for(folder, enable_prefix_caching=True, num_kv_blocks=256)
    for i, prompt in enumerate(prompts):
        cached.add_request(str(i), prompt, GREEDY)
    with_cache = run_to_completion(cached)
    plain = engine_for(folder, num_kv_blocks=256)
    for i, prompt in enumerate(prompts):
        plain.add_request(str(i), prompt, GREEDY)
    without = run_to_completion(plain)
    assert all(with_cache[k].outputs[0].token_ids == without[k].outputs[0].token_ids for k in without)
    assert cached.get_stats().num_prompt_tokens < plain.get_stats().num_prompt_tokens - 20 * 96
