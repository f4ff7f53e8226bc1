import logging

import pytest

from tests.conftest import run_to_completion
from tests.test_parity_random import random_prompts
from wde import LLMEngine, SamplingParams


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_stats_count_what_ran_and_are_logged_every_interval(tiny_model_dir, caplog, async_scheduling):
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=32,
                                        enable_prefix_caching=True, max_num_seqs=2, async_scheduling=async_scheduling)
    engine.stats_tracker.interval_s = 0.0  # a line at every step
    for i, prompt in enumerate(random_prompts([20, 35, 8])):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    engine.step()
    stats = engine.get_stats()
    assert (stats.num_running, stats.num_waiting) == (2, 1)
    assert stats.kv_blocks_used == 5 and stats.kv_blocks_total == 32  # 2 + 3 blocks of 16 for 20 and 35 tokens
    rates = []
    with caplog.at_level(logging.INFO, logger="wde.core.engine.stats"):
        while engine.has_unfinished_requests():
            engine.step()
            rates.append(engine.get_stats().generation_tokens_per_s)
    stats = engine.get_stats()
    assert stats.num_prompt_tokens == 63 and stats.num_generation_tokens == 15
    # a rate per interval (here every step); async scheduling's last step only collects, generating nothing new
    assert stats.prompt_tokens_per_s >= 0 and min(rates) >= 0 and max(rates) > 0
    assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0
    assert any("generation" in r.message and "prefix cache hit rate" in r.message for r in caplog.records)


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_generation_tokens_are_the_tokens_the_requests_got(tiny_model_dir, async_scheduling):
    """Async scheduling samples one token too many for a sequence that stops (or is aborted) while its next
    step runs; that token is dropped, and is not counted."""
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=32,
                                        async_scheduling=async_scheduling)
    for i, prompt in enumerate(random_prompts([5, 9, 3, 7])):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[7, 11, 13]))
    engine.add_request("aborted", [5, 6], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort_request("aborted")
    outputs = run_to_completion(engine)
    # the aborted request's tokens: each of the three steps gives one (the prefill too); overlapped, the third
    # was still in flight when it was aborted
    aborted_tokens = 2 if async_scheduling else 3
    assert engine.get_stats().num_generation_tokens == sum(len(o.outputs[0].token_ids) for o in outputs.values()) \
        + aborted_tokens
