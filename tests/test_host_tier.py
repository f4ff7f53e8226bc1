"""The KV cache's host tier (kv_offload_gib): prefix blocks evicted from the device's cache are copied to host
memory and copied back on a later hit; on the CPU the device's cache and the host tier are two CPU tensors."""
import pytest

from tests.conftest import assert_all_blocks_free, run_to_completion
from tests.test_parity_random import random_prompts
from wde import LLMEngine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
LONGER = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)  # sequences that grow into preemptions


def engine_for(folder: str, **args) -> LLMEngine:
    return LLMEngine.from_engine_args(model=folder, max_model_len=1024,
                                      **{"num_kv_blocks": 24, "enable_prefix_caching": True, **args})


def generate(engine: LLMEngine, request_id: str, prompt: list[int]):
    engine.add_request(request_id, prompt, GREEDY)
    return run_to_completion(engine)[request_id]


def test_an_evicted_prefix_comes_back_from_the_host_tier(tiny_model_dir):
    folder = tiny_model_dir("qwen3")
    # 10 full blocks; then a prompt of 23 blocks evicts 9 of them (of 24), the tail first
    first, filler = random_prompts([160, 360], seed=21)
    engine = engine_for(folder, num_kv_offload_blocks=64)
    out_first = generate(engine, "first", first)
    generate(engine, "filler", filler)
    tier = engine.kv_cache_manager.host_tier
    assert tier.num_spilled_blocks == 9 and tier.num_held == 9
    again = generate(engine, "again", first)
    assert again.num_cached_tokens == 144  # 9 blocks (the last token is always computed): 1 on the device
    assert tier.num_hit_blocks == 8
    stats = engine.get_stats()
    assert (stats.num_host_hit_blocks, stats.num_host_spilled_blocks, stats.host_kv_blocks_total) == (
        8, tier.num_spilled_blocks, 64)
    assert again.outputs[0].token_ids == out_first.outputs[0].token_ids
    plain = engine_for(folder)
    generate(plain, "first", first)
    generate(plain, "filler", filler)
    assert generate(plain, "again", first).num_cached_tokens == 16  # without the tier: 1 block, the rest recomputed


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_tokens_are_the_same_with_and_without_the_tier_under_pressure(tiny_model_dir, async_scheduling):
    """Conversations that come back to their prefixes over a device cache that holds about two of them at a
    time: blocks spill, come back, are preempted and aborted; every greedy token as without the tier, and each
    tier's block accounting exact at the end."""
    folder = tiny_model_dir("qwen3")
    turns = conversation_turns()
    results = {}
    for host_blocks in (None, 48):
        engine = engine_for(folder, num_kv_blocks=20, max_num_seqs=3, async_scheduling=async_scheduling,
                            num_kv_offload_blocks=host_blocks)
        for index, prompt in enumerate(turns):
            engine.add_request(f"turn-{index}", prompt, LONGER)
            if index % 3 == 2:
                engine.add_request(f"aborted-{index}", prompt[:50], GREEDY)
                engine.step()
                engine.abort_request(f"aborted-{index}")
        outputs = run_to_completion(engine)
        results[host_blocks] = {k: v.outputs[0].token_ids for k, v in outputs.items() if k.startswith("turn")}
        manager = engine.kv_cache_manager
        assert manager.num_free_blocks == manager.num_blocks
        if host_blocks:
            tier = manager.host_tier
            assert tier.num_hit_blocks > 0 and tier.num_spilled_blocks > 0
            assert engine.get_stats().num_preemptions
            assert tier.num_held + len(tier.free_blocks()) == host_blocks
    assert results[None] == results[48]


def conversation_turns() -> list[list[int]]:
    """Twelve prompts over four histories of one system prompt."""
    system = random_prompts([64], seed=30)[0]
    histories = [system + turn for turn in random_prompts([40, 56, 72, 88], seed=31)]
    return [histories[i % 4] + random_prompts([8 + i], seed=40 + i)[0] for i in range(12)]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preempted_sequences_swap_out_and_back_without_prefix_caching(tiny_model_dir, async_scheduling):
    """preemption_mode="swap" (the default with a tier): a preempted sequence's full blocks go to the host tier
    and come back when it resumes, so it computes only its last partial block again; every greedy token as
    when it recomputes everything."""
    folder = tiny_model_dir("qwen3")
    results, stats = {}, {}
    for mode, host_blocks in (("recompute", None), ("swap", 64)):
        # float32 on a GPU too: a recomputed prefill's K/V and those of the decode steps differ in 16 bits
        engine = engine_for(folder, num_kv_blocks=20, max_num_seqs=3, enable_prefix_caching=False, dtype="float32",
                            async_scheduling=async_scheduling, num_kv_offload_blocks=host_blocks,
                            preemption_mode=mode)
        for index, prompt in enumerate(conversation_turns()):
            engine.add_request(f"turn-{index}", prompt, LONGER)
        outputs = run_to_completion(engine)
        results[mode] = {k: v.outputs[0].token_ids for k, v in outputs.items()}
        stats[mode] = engine.get_stats()
        assert_all_blocks_free(engine)
    assert results["swap"] == results["recompute"]
    swap, recompute = stats["swap"], stats["recompute"]
    assert swap.num_preemptions and recompute.num_preemptions
    assert swap.num_swapped_blocks == swap.num_host_spilled_blocks > 0 and swap.num_host_hit_blocks > 0
    # each block back from the host is 16 tokens not computed again (2,432 against 1,711 when measured)
    assert recompute.num_prompt_tokens - swap.num_prompt_tokens >= 15 * swap.num_host_hit_blocks
    block_bytes = engine.kv_cache_manager.host_tier.block_bytes
    assert swap.host_kv_bytes_loaded == swap.num_host_hit_blocks * block_bytes > 0
    on_cpu = engine.executor.worker.device.type == "cpu"  # a CPU's copies hold its step for their whole time
    assert swap.step_times.host_copy_wait_s > 0 if on_cpu else swap.step_times.host_copy_wait_s >= 0


@pytest.mark.parametrize("encoder", [False, True])
def test_a_prefill_only_host_tier_with_nothing_to_hold_is_refused(tiny_model_dir, tmp_path, encoder):
    """A decoder embedder without prefix caching (nothing is preempted: nothing to swap), and an encoder (no KV)."""
    from tests.encoder_models import write_encoder
    from wde import LLM
    folder = str(write_encoder(tmp_path / "bert", "bert")) if encoder else tiny_model_dir("qwen2")
    message = "keeps no KV cache" if encoder else "never preempts"
    with pytest.raises(ValueError, match=message):
        LLM(model=folder, task="embed", num_kv_offload_blocks=8, enable_prefix_caching=encoder)


def test_preemption_mode_recompute_keeps_the_tier_for_evicted_prefixes(tiny_model_dir):
    engine = engine_for(tiny_model_dir("qwen3"), num_kv_blocks=20, max_num_seqs=3, num_kv_offload_blocks=64,
                        preemption_mode="recompute")
    for index, prompt in enumerate(conversation_turns()):
        engine.add_request(f"turn-{index}", prompt, LONGER)
    run_to_completion(engine)
    stats = engine.get_stats()
    assert stats.num_preemptions and stats.num_swapped_blocks == 0 and stats.num_host_spilled_blocks > 0


@pytest.mark.parametrize("args, message", [
    ({"preemption_mode": "swap"}, "preemption_mode='swap' moves .* set kv_offload_gib"),
    ({"preemption_mode": "recompute", "num_kv_offload_blocks": 8}, "with neither they would hold nothing"),
    ({"num_kv_offload_blocks": True}, "num_kv_offload_blocks"),
    ({"kv_offload_gib": True, "enable_prefix_caching": True}, "kv_offload_gib"),
    ({"preemption_mode": "sometimes"}, "preemption_mode")])
def test_preemption_settings_that_cannot_work_are_refused(args, message):
    from pydantic import ValidationError

    from wde.core.config import EngineArgs
    with pytest.raises(ValidationError, match=message):
        EngineArgs(**args)


def test_a_host_tier_larger_than_host_memory_is_refused_by_name(tiny_model_dir):
    with pytest.raises(ValueError, match="host memory available: lower kv_offload_gib or num_kv_offload_blocks"):
        engine_for(tiny_model_dir("qwen3"), num_kv_offload_blocks=10**12)


def test_copies_of_a_failed_step_and_of_blocks_it_wrote_are_forgotten():
    from wde.core.kv_cache.host_tier import HostTier
    tier = HostTier(4, block_bytes=100)
    tier.spill(b"a", 7)
    tier.spill(b"b", 8)
    tier.load(b"a", 3)
    dropped = tier.take_copies()
    tier.drop(dropped)  # its step never ran: nothing was copied either way
    assert (tier.num_held, tier.num_spilled_blocks, tier.num_hit_blocks) == (0, 0, 0)
    tier.spill(b"a", 7)
    tier.take_copies()
    tier.spill(b"c", 9)
    tier.forget({7})  # the step in flight when "a" was copied from block 7 failed: the copy holds what it wrote
    assert not tier.holds(b"a") and tier.holds(b"c")
    tier.take_copies()
    tier.take_copies()
    tier.forget({9})  # two steps on, block 9's copy was taken before anything failed
    assert tier.holds(b"c") and len(tier.free_blocks()) == 3


def test_metrics_carry_the_host_tier():
    from wde.core.engine.stats import EngineStats
    from wde.entrypoints.openai.metrics import render
    from wde.core.engine.stats import StepTimes
    text = render({}, {"m": EngineStats(host_kv_blocks_used=9, host_kv_blocks_total=64, num_host_hit_blocks=8,
                                        num_host_spilled_blocks=9, num_swapped_blocks=4, host_kv_bytes_loaded=800,
                                        host_kv_bytes_spilled=900, step_times=StepTimes(host_copy_wait_s=0.25))})
    assert 'wde_host_kv_cache_usage_ratio{model="m"} 0.140625' in text
    assert 'wde_host_kv_blocks_hit_total{model="m"} 8' in text
    assert 'wde_host_kv_blocks_spilled_total{model="m"} 9' in text
    assert 'wde_host_kv_blocks_swapped_total{model="m"} 4' in text
    assert 'wde_host_kv_bytes_loaded_total{model="m"} 800' in text
    assert 'wde_host_kv_bytes_spilled_total{model="m"} 900' in text
    assert 'wde_host_kv_copy_wait_seconds_total{model="m"} 0.25' in text
    assert "wde_host_kv_blocks_hit_total{" not in render({}, {"m": EngineStats()})  # no tier: no samples


def test_a_decoder_embedder_reads_its_evicted_instruction_back_from_the_host_tier(tiny_model_dir):
    """Prefill-only workflows share the tier: an instruction pushed out of a small device cache by other inputs
    comes back from the host, and the embeddings are those computed without any cache."""
    from wde import LLM
    folder = tiny_model_dir("qwen2")
    instruction, other = random_prompts([96, 200], seed=50)
    texts = [instruction + t for t in random_prompts([5, 9], seed=51)]
    llm = LLM(model=folder, task="embed", num_kv_blocks=16, enable_prefix_caching=True, num_kv_offload_blocks=32)
    llm.embed(texts[:1])
    llm.embed([other])  # 13 blocks of 16: the instruction's last blocks leave the device's cache (the tail first)
    again = llm.embed(texts)
    assert llm.engine.kv_cache_manager.host_tier.num_hit_blocks == 3
    assert [o.num_cached_tokens for o in again][0] == 96
    plain = LLM(model=folder, task="embed", num_kv_blocks=64).embed(texts)
    for a, b in zip(again, plain):
        assert (a.outputs.data - b.outputs.data).abs().max() < 1e-5


def test_a_float8_cache_comes_back_from_the_host_tier(tiny_model_dir):
    folder = tiny_model_dir("qwen3")
    first, filler = random_prompts([160, 360], seed=21)
    outputs = {}
    for host_blocks in (None, 64):
        engine = engine_for(folder, kv_cache_dtype="fp8", num_kv_offload_blocks=host_blocks)
        generate(engine, "first", first)
        generate(engine, "filler", filler)
        outputs[host_blocks] = generate(engine, "again", first)
    assert outputs[64].outputs[0].finish_reason == "length" and outputs[64].num_cached_tokens == 144
    assert outputs[64].outputs[0].token_ids == outputs[None].outputs[0].token_ids


@pytest.mark.parametrize("gib", [float("inf"), 1e300, float("nan"), -1])
def test_host_tier_sizes_that_cannot_be_are_refused_by_name(gib):
    from pydantic import ValidationError

    from wde.core.config import EngineArgs
    with pytest.raises(ValidationError, match="kv_offload_gib"):
        EngineArgs(kv_offload_gib=gib, enable_prefix_caching=True)


def test_a_host_tier_smaller_than_one_block_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="kv_offload_gib=1e-06 holds no KV block"):
        engine_for(tiny_model_dir("qwen3"), kv_offload_gib=1e-6)
