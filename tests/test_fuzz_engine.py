"""Fuzzing LLMEngine and LLM with arbitrary prompts and params mixed with good requests.

After every step: no output for a request that was never accepted, none finished twice, every KV block either
free or used by exactly its sequences. After each case: the good requests finished with the tokens they get
alone; each bad one was refused when submitted (ValueError / TypeError with a message) or failed alone with a
message and was not blamed on the engine (internal_error is False: a request's own content never trips an
internal failure); the engine is idle within a bounded number of steps, with every KV block free.
"""
import re

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.conftest import assert_all_blocks_free
from tests.fuzz import Shared, count_case, fuzz_settings, params, prompts, sampling_fields
from tests.tiny_models import VOCAB_SIZE
from wde import LLM, LLMEngine, RequestOutput, SamplingParams

MAX_MODEL_LEN = 64
MAX_STEPS = 3000  # a bound no case's requests need: n <= 3 sequences of <= 64 tokens, 4 at a time
GOOD = {"good-ids": ([7, 8, 9], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)),
        "good-text": ("w10 w11 w12", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2))}
bad_request = st.tuples(prompts(VOCAB_SIZE, MAX_MODEL_LEN), params(sampling_fields(VOCAB_SIZE)))


def make_engine(folder: str, async_scheduling: bool) -> LLMEngine:
    """Small budgets, so cases reach chunked prefill, preemption and prefix-cache hits."""
    return LLMEngine.from_engine_args(model=folder, num_kv_blocks=14, block_size=16, max_model_len=MAX_MODEL_LEN,
                                      max_num_seqs=4, max_num_batched_tokens=32, enable_prefix_caching=True,
                                      async_scheduling=async_scheduling, disable_log_stats=True)


def finish(engine: LLMEngine, accepted: set[str]) -> dict:
    """Step until idle (at most MAX_STEPS steps), checking the engine after every step. If a check fails, the
    engine is emptied first, so the next case (hypothesis replays and shrinks) starts from an idle engine."""
    try:
        return checked_steps(engine, accepted)
    except BaseException:
        for request_id in accepted:
            engine.abort_request(request_id)
        for _ in range(8):  # async scheduling: a step still in flight
            engine.step()
        raise


def checked_steps(engine: LLMEngine, accepted: set[str]) -> dict:
    finished = {}
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished_requests():
            break
        for output in engine.step():
            assert output.request_id in accepted, f"an output for {output.request_id!r}, never accepted"
            if output.finished:
                assert output.request_id not in finished, f"{output.request_id} finished twice"
                finished[output.request_id] = output
        assert_blocks_accounted(engine)
    assert not engine.has_unfinished_requests(), f"still busy after {MAX_STEPS} steps: the engine hangs"
    assert_all_blocks_free(engine)
    return finished


def assert_blocks_accounted(engine: LLMEngine) -> None:
    allocator = engine.kv_cache_manager.allocator
    users = [0] * allocator.num_blocks
    # decoding sequences hold blocks while they run; prefill-only inputs while their step runs (async scheduling:
    # the step launched last)
    holders = list(getattr(engine.scheduler, "running", []))
    if getattr(engine.scheduler, "uses_kv_cache", False) and hasattr(engine.scheduler, "in_step"):
        holders += engine.scheduler.in_step.values()
    for seq in holders:
        for block in seq.block_table:
            users[block] += 1
    assert users == allocator.ref_counts, "reference counts differ from the sequences that use the blocks"
    assert not allocator.free_blocks() & {b for b, count in enumerate(users) if count}


def assert_failed_alone(request_id: str, output) -> None:
    event("failed: " + output.error.split(":")[0][:40] if output.error else "accepted and finished")
    if output.error is not None:
        assert output.error.strip(), f"{request_id} failed with no message"
        assert not output.internal_error, f"{request_id}'s content made the engine fail: {output.error}"
        assert not isinstance(output, RequestOutput) or output.outputs[0].finish_reason == "error"


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def shared(request, tiny_model_dir):
    engine = make_engine(tiny_model_dir("qwen3"), async_scheduling=request.param)
    expected = {}
    for request_id, (prompt, sampling) in GOOD.items():  # each alone
        engine.add_request(request_id, prompt, sampling)
        expected[request_id] = finish(engine, {request_id})[request_id]
    return Shared(engine=engine, expected=expected)


@fuzz_settings(ci_examples=100)
@given(bad=st.lists(bad_request, min_size=1, max_size=3), good_first=st.booleans())
def test_bad_requests_fail_alone_among_good_ones(shared, bad, good_first):
    count_case("engine: bad requests among good ones")
    engine, expected = shared.engine, shared.expected
    accepted: set[str] = set()
    submissions = [(request_id, prompt, p) for request_id, (prompt, p) in GOOD.items()]
    bad_ones = [(f"bad-{i}", prompt, p) for i, (prompt, p) in enumerate(bad)]
    for request_id, prompt, request_params in (submissions + bad_ones if good_first else bad_ones + submissions):
        try:
            engine.add_request(request_id, prompt, request_params)
        except (ValueError, TypeError) as e:
            assert request_id.startswith("bad-") and str(e).strip(), f"refused with no message: {e!r}"
            event("refused when submitted")
            continue
        accepted.add(request_id)
    outputs = finish(engine, accepted)
    assert set(outputs) == accepted
    for request_id, output in outputs.items():
        if request_id in GOOD:
            want = expected[request_id]
            assert output.error is None and output.outputs[0].token_ids == want.outputs[0].token_ids
        else:
            assert_failed_alone(request_id, output)


@pytest.fixture(scope="module")
def llm_shared(tiny_model_dir):
    llm = LLM(model=tiny_model_dir("qwen3"), num_kv_blocks=14, max_model_len=MAX_MODEL_LEN, max_num_seqs=4,
              max_num_batched_tokens=32)
    prompt, sampling = GOOD["good-ids"]
    return Shared(llm=llm, alone=llm.generate([prompt], sampling, use_tqdm=False)[0].outputs[0].token_ids)


@fuzz_settings(ci_examples=40)
@given(bad=st.lists(bad_request, min_size=1, max_size=3), position=st.integers(0, 2))
def test_llm_generate_with_bad_prompts(llm_shared, bad, position):
    """LLM.generate refuses a batch with a prompt or params it cannot take, naming which prompt, and leaves
    nothing queued; or it returns every output, in order, the failed ones with their error."""
    count_case("LLM.generate with bad prompts")
    llm, alone = llm_shared.llm, llm_shared.alone
    good_prompt, good_params = GOOD["good-ids"]
    batch = [(good_prompt, good_params)] * 2
    batch[position:position] = bad
    try:
        outputs = llm.generate([prompt for prompt, _ in batch], [p for _, p in batch], use_tqdm=False)
    except (ValueError, TypeError) as e:
        # names the prompt, or (a list that starts with an int is one prompt of token ids) the count mismatch
        assert re.match(r"prompt \d+: .|\d+ SamplingParams for \d+ prompts", str(e)), f"unclear refusal: {e}"
        assert_all_blocks_free(llm.engine)
    else:
        assert len(outputs) == len(batch)
        for output, (prompt, _) in zip(outputs, batch):
            if prompt is good_prompt:
                assert output.outputs[0].token_ids == alone
            else:
                assert_failed_alone(output.request_id, output)
    assert llm.generate([good_prompt], good_params, use_tqdm=False)[0].outputs[0].token_ids == alone
