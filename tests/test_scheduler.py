"""Continuous batching: budgets hold, requests join and leave at every step, results never depend on it."""
import pytest

from tests.conftest import assert_all_blocks_free, run_to_completion
from tests.test_parity_random import random_prompts
from wde import LLMEngine, SamplingParams
from wde.workflows.decoding.sequence import SequenceStatus

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def record_schedules(engine) -> list:
    """Wrap the scheduler so every SchedulerOutput is kept (as (seq, start, num_tokens) tuples)."""
    log, schedule = [], engine.scheduler.schedule

    def recording():
        output = schedule()
        log.append([(s.seq, s.start, s.num_tokens) for s in output.scheduled])
        return output
    engine.scheduler.schedule = recording
    return log


def generate_alone(folder: str, prompts: list, params: SamplingParams) -> list[list[int]]:
    results = []
    for prompt in prompts:
        engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=64)
        engine.add_request("only", prompt, params)
        results.append(run_to_completion(engine)["only"].outputs[0].token_ids)
    return results


def test_steps_stay_within_budgets_and_mix_prefill_with_decode(tiny_model_dir):
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("llama"), num_kv_blocks=64, max_num_seqs=3,
                                        max_num_batched_tokens=24)
    log = record_schedules(engine)
    for i, prompt in enumerate(random_prompts([30, 5, 12, 50, 7])):
        # request 1 stops early, so the 50-token prompt joins two running decodes
        engine.add_request(str(i), prompt, GREEDY.model_copy(update={"max_tokens": 3 if i == 1 else 12}))
    run_to_completion(engine)
    for step in log:
        assert len(step) <= 3
        assert sum(n for _, _, n in step) <= 24
    assert any(any(n == 1 for *_, n in step) and any(n > 1 for *_, n in step) for step in log)
    chunks = [n for step in log for seq, start, n in step if seq.group.request_id == "3" and n > 1]
    assert len(chunks) >= 3 and sum(chunks) == 50  # the 50-token prompt was prefilled in several chunks


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_requests_join_and_leave_mid_flight(tiny_model_dir, async_scheduling):
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=64,
                                        async_scheduling=async_scheduling)
    log = record_schedules(engine)
    engine.add_request("early", [5, 6, 7], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.add_request("late", [8, 9], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    finished = run_to_completion(engine)
    step_of_late = next(i for i, step in enumerate(log) if any(s.group.request_id == "late" for s, *_ in step))
    ids_in = lambda i: {s.group.request_id for s, *_ in log[i]}  # noqa: E731
    assert step_of_late == 3 and ids_in(3) == {"early", "late"}  # joined a running batch
    last = max(i for i, step in enumerate(log) if step)  # (async: the very last call only collects)
    assert ids_in(last) == {"early"}  # and left it before "early" finished
    assert len(finished["early"].outputs[0].token_ids) == 10


def test_chunked_prefill_and_small_batches_give_the_same_tokens(tiny_model_dir):
    folder = tiny_model_dir("qwen2")
    prompts = random_prompts([40, 9, 70, 3], seed=1)
    expected = generate_alone(folder, prompts, GREEDY)
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=64, max_num_seqs=2, max_num_batched_tokens=16)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    outputs = run_to_completion(engine)
    assert [outputs[str(i)].outputs[0].token_ids for i in range(len(prompts))] == expected


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_a_prompt_the_budget_cuts_to_one_token_a_step_samples_only_at_its_end(tiny_model_dir, async_scheduling):
    """Three sequences decode in a budget of 4 tokens: the prompt that joins them gets one token a step, which
    the one-token fast path took for a decode step (a sample after each, its tokens then wrong)."""
    folder = tiny_model_dir("llama")
    prompts = random_prompts([3, 3, 3, 13], seed=1)
    expected = generate_alone(folder, prompts[3:], GREEDY)
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=100, block_size=4, max_num_batched_tokens=4,
                                        async_scheduling=async_scheduling)
    for i, prompt in enumerate(prompts[:3]):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.add_request("joins", prompts[3], GREEDY)
    schedule, samples_mid_prompt = engine.scheduler.schedule, []

    def checked():
        output = schedule()
        samples_mid_prompt.extend(s for s in output.scheduled
                                  if s.samples and s.start + s.num_tokens < s.seq.num_prompt_tokens)
        return output
    engine.scheduler.schedule = checked
    assert run_to_completion(engine)["joins"].outputs[0].token_ids == expected[0]
    assert not samples_mid_prompt


def test_preemption_frees_blocks_and_recomputes_to_the_same_tokens(tiny_model_dir):
    folder = tiny_model_dir("qwen3")
    prompts = random_prompts([20, 25, 30, 18], seed=2)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = generate_alone(folder, prompts, params)
    # 4 requests of up to 50 tokens need 4 blocks of 16 each; 8 blocks force preemption
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=8, block_size=16)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs = run_to_completion(engine)
    assert engine.scheduler.num_preemptions > 0
    assert [outputs[str(i)].outputs[0].token_ids for i in range(len(prompts))] == expected


@pytest.mark.parametrize("steps_before_abort", [0, 1, 3])
def test_abort_frees_blocks_in_any_state(tiny_model_dir, steps_before_abort):
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=16, max_num_seqs=1)
    engine.add_request("first", [5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    engine.add_request("second", [8, 9], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for _ in range(steps_before_abort):
        engine.step()
    assert engine.abort_request("first") and engine.abort_request("second")
    assert not engine.abort_request("second")
    assert_all_blocks_free(engine)
    assert engine.step() == []


def test_abort_a_preempted_request(tiny_model_dir):
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=4, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for request_id in ("a", "b"):
        engine.add_request(request_id, random_prompts([20])[0], params)
    while not engine.scheduler.num_preemptions:
        engine.step()
    preempted = engine.scheduler.waiting[0]
    assert preempted.num_preemptions == 1 and not preempted.block_table
    assert engine.abort_request(preempted.group.request_id)
    finished = run_to_completion(engine)
    assert list(finished) == ["a" if preempted.group.request_id == "b" else "b"]


def test_abort_one_of_n_completions_keeps_finished_reasons(tiny_model_dir):
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=16)
    engine.add_request("r", [5, 6], SamplingParams(temperature=0, max_tokens=3, n=2, ignore_eos=True))
    group = None
    while group is None or not group.sequences[0].is_finished:
        engine.step()
        group = engine.scheduler.requests.get("r", group)
    assert all(seq.status is SequenceStatus.FINISHED for seq in group.sequences)
    assert not engine.abort_request("r")  # already done
    assert_all_blocks_free(engine)
