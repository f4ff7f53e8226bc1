"""A request's tokens do not depend on what else runs: batch of 64, chunked prefill, preemption, prefix hits.

"Alone" is the same engine type with max_num_seqs=1: every request runs by itself, one after the other.
"""
import random

import pytest

from tests.conftest import run_to_completion
from tests.test_parity_random import random_prompts
from wde import LLMEngine, SamplingParams

NUM_REQUESTS = 64


def workload(shared_prefix: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(21)
    system = random_prompts([shared_prefix], seed=22)[0] if shared_prefix else []
    prompts = [system + random_prompts([rng.randint(3, 60)], seed=1000 + i)[0] for i in range(NUM_REQUESTS)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(4, 20), ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_tokens=rng.randint(4, 20), ignore_eos=True)
              for i in range(NUM_REQUESTS)]
    return prompts, params


def run(folder: str, prompts, params, **engine_args) -> tuple[list[list[int]], LLMEngine]:
    engine = LLMEngine.from_engine_args(model=folder, **{"num_kv_blocks": 512, **engine_args})
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    outputs = run_to_completion(engine)
    return [outputs[str(i)].outputs[0].token_ids for i in range(len(prompts))], engine


@pytest.mark.parametrize("case,engine_args,shared_prefix", [
    ("batch of 64", {}, 0),
    ("chunked prefill", {"max_num_batched_tokens": 32}, 0),
    ("preemption", {"num_kv_blocks": 20, "max_num_batched_tokens": 64}, 0),
    ("prefix cache hits", {"enable_prefix_caching": True}, 80),
])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_outputs_equal_running_alone(tiny_model_dir, case, engine_args, shared_prefix, async_scheduling):
    folder = tiny_model_dir("qwen3")
    prompts, params = workload(shared_prefix)
    alone, _ = run(folder, prompts, params, max_num_seqs=1)
    together, engine = run(folder, prompts, params, async_scheduling=async_scheduling, **engine_args)
    assert together == alone
    check_stats(engine, case, prompts)


@pytest.mark.parametrize("case,engine_args", [("chunked prefill", {"max_num_batched_tokens": 32}),
                                              ("preemption", {"num_kv_blocks": 20, "max_num_batched_tokens": 64})])
@pytest.mark.parametrize("shape", ["qwen3_moe", "mixtral"])
def test_a_mixture_of_experts_outputs_equal_running_alone(tiny_model_dir, shape, case, engine_args):
    """Which experts a token takes, and what they give it, do not depend on the tokens routed beside it."""
    folder = tiny_model_dir(shape)
    prompts, params = workload()
    alone, _ = run(folder, prompts, params, max_num_seqs=1)
    together, engine = run(folder, prompts, params, async_scheduling=True, **engine_args)
    assert together == alone
    check_stats(engine, case, prompts)


# a window of 8 under chunks of 32, prompts up to 140 and a shared prefix of 80; preemption: too few blocks for all
# (Gemma 3's five windowed groups need more of them for one sequence)
WINDOWED_CASES = [("chunked prefill", {"max_num_batched_tokens": 32}, 0),
                  ("preemption", {"num_kv_blocks": None, "max_num_batched_tokens": 64}, 0),
                  ("prefix cache hits", {"enable_prefix_caching": True}, 80)]
PREEMPTION_BLOCKS = {"mistral": 20, "gemma2": 20, "gemma3": 40}


@pytest.mark.parametrize("case,engine_args,shared_prefix", WINDOWED_CASES, ids=[c[0] for c in WINDOWED_CASES])
@pytest.mark.parametrize("shape", ["mistral", "gemma2", "gemma3"])
def test_windowed_layers_outputs_equal_running_alone(tiny_model_dir, shape, case, engine_args, shared_prefix):
    """Chunks and prefix hits that cross the window, and preemption, with the blocks before the window given
    back (every layer's window: Mistral; local layer groups beside a global one: Gemma)."""
    folder = tiny_model_dir(shape, sliding_window=8)
    prompts, params = workload(shared_prefix)
    if engine_args.get("num_kv_blocks", 0) is None:
        engine_args = {**engine_args, "num_kv_blocks": PREEMPTION_BLOCKS[shape]}
    alone, _ = run(folder, prompts, params, max_num_seqs=1)
    together, engine = run(folder, prompts, params, async_scheduling=True, **engine_args)
    assert together == alone
    check_stats(engine, case, prompts)


def check_stats(engine: LLMEngine, case: str, prompts: list[list[int]]) -> None:
    stats = engine.get_stats()
    if case == "preemption":
        assert stats.num_preemptions > 0
    if case == "prefix cache hits":
        assert stats.prefix_cache_hit_rate > 0.5
    if case == "chunked prefill":
        assert stats.num_prompt_tokens == sum(map(len, prompts))
