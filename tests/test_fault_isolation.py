"""Whatever one request carries, it fails alone with a message naming what was wrong; the others go on, its KV
blocks are freed, nothing hangs. One test per defect found by trying bad inputs as a user would; the fuzz
tests (test_fuzz_*.py) look for the ones nobody thought of."""
import pytest
from pydantic import ValidationError

from tests.conftest import assert_all_blocks_free
from wde import LLM, LLMEngine, PoolingParams, SamplingParams
from wde.core.config import default_embed_model_path
from wde.tasks.chat.workflow import ChatWorkflow
from wde.workflows.decoding.model_pre_processor import DecodingModelPreProcessor

GOOD = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
MAX_STEPS = 500  # far more than any of these requests needs: reaching it means the engine hangs


def run_bounded(engine) -> dict:
    """Step until idle, at most MAX_STEPS times; request id -> final output."""
    finished = {}
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished_requests():
            break
        for output in engine.step():
            if output.finished:
                assert output.request_id not in finished, "a request finished twice"
                finished[output.request_id] = output
    assert not engine.has_unfinished_requests(), "the engine still has requests after MAX_STEPS steps"
    assert_all_blocks_free(engine)
    return finished


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=32, max_model_len=64,
                                      disable_log_stats=True)


@pytest.fixture(scope="module")
def alone(engine) -> list[int]:
    """The good request's tokens when it runs alone."""
    engine.add_request("alone", [7, 8, 9], GOOD)
    return run_bounded(engine)["alone"].outputs[0].token_ids


# 1. a lone surrogate: refused when submitted; a tokenizer that still raises at schedule time fails only that one

def test_a_lone_surrogate_in_a_prompt_is_refused_naming_it(engine):
    with pytest.raises(ValueError, match=r"the prompt is not valid Unicode: character 2 is '\\ud800'"):
        engine.add_request("bad", "ab\ud800", GOOD)
    with pytest.raises(ValueError, match="stop string 0 is not valid Unicode"):
        SamplingParams(stop=["\udfff"])
    assert not engine.has_unfinished_requests()


def test_a_tokenizer_error_at_schedule_time_fails_that_request_alone(engine, alone, monkeypatch):
    tokenizer = engine.request_processor.tokenizer
    real_encode = tokenizer.encode

    def encode(text, add_special_tokens=True):
        if "poison" in text:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return real_encode(text, add_special_tokens)
    monkeypatch.setattr(tokenizer, "encode", encode)
    engine.add_request("good", [7, 8, 9], GOOD)
    engine.add_request("bad", "w5 poison", GOOD)
    engine.add_request("good-2", [7, 8, 9], GOOD)
    outputs = run_bounded(engine)
    assert outputs["bad"].outputs[0].finish_reason == "error" and "TextEncodeInput" in outputs["bad"].error
    assert not outputs["bad"].internal_error  # the tokenizer refused what the request carried
    assert outputs["good"].outputs[0].token_ids == alone and outputs["good-2"].outputs[0].token_ids == alone


def test_a_prefill_only_tokenizer_error_fails_that_input_alone(monkeypatch):
    llm = LLM(model=default_embed_model_path(), max_model_len=32)
    tokenizer = llm.engine.request_processor.tokenizer
    real = tokenizer.hf

    def hf(text, *args, **kwargs):
        if "poison" in text:
            raise TypeError("cannot tokenize this")
        return real(text, *args, **kwargs)
    monkeypatch.setattr(tokenizer, "hf", hf)
    good, bad, good_2 = llm.embed(["a text", "poison", "another"])
    assert bad.outputs is None and bad.error == "cannot tokenize this"
    assert good.outputs is not None and good_2.outputs is not None
    assert_all_blocks_free(llm.engine)


# 2. top_k beyond any vocabulary: refused by name; the largest allowed one runs beside a good request

def test_top_k_out_of_range_is_refused_and_a_huge_valid_one_samples_from_everything(engine, alone):
    with pytest.raises(ValidationError, match="top_k"):
        SamplingParams(top_k=2**70)
    engine.add_request("good", [7, 8, 9], GOOD)
    engine.add_request("huge-k", [5, 6], SamplingParams(top_k=2**31 - 1, seed=1, max_tokens=4))
    outputs = run_bounded(engine)
    assert outputs["huge-k"].error is None and len(outputs["huge-k"].outputs[0].token_ids) == 4
    assert outputs["good"].outputs[0].token_ids == alone


class PickyPreProcessor(DecodingModelPreProcessor):
    """Cannot build a step that holds token 13 (as the old code could not build one with top_k=2**70)."""

    def __call__(self, scheduler_output):
        if any(13 in s.seq.token_ids for s in scheduler_output.scheduled):
            raise OverflowError("Overflow when unpacking long")
        return super().__call__(scheduler_output)


class PickyWorkflow(ChatWorkflow):
    ModelPreProcessor = f"{__name__}:PickyPreProcessor"


class LatePickyPreProcessor(DecodingModelPreProcessor):
    """Cannot build a step once request "bad" has 3 output tokens: by then the other requests are decoding,
    with async scheduling each taking its input token from the last step's samples (by its row there)."""

    def __call__(self, scheduler_output):
        for s in scheduler_output.scheduled:
            if s.seq.request.request_id == "bad" and s.seq.num_output_tokens >= 3:
                raise OverflowError("Overflow when unpacking long")
        return super().__call__(scheduler_output)


class LatePickyWorkflow(ChatWorkflow):
    ModelPreProcessor = f"{__name__}:LatePickyPreProcessor"


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_request_that_breaks_the_step_mid_generation_fails_alone(tiny_model_dir, alone, async_scheduling):
    engine = LLMEngine.from_workflow(LatePickyWorkflow, model=tiny_model_dir("qwen3"), num_kv_blocks=32,
                                     max_model_len=64, async_scheduling=async_scheduling)
    engine.add_request("other", [20, 30, 40], GOOD)
    other_alone = run_bounded(engine)["other"].outputs[0].token_ids
    engine.add_request("good", [7, 8, 9], GOOD)
    engine.add_request("bad", [5, 6], GOOD)
    engine.add_request("other", [20, 30, 40], GOOD)  # behind the bad one: its row among the samples moves
    outputs = run_bounded(engine)
    assert outputs["bad"].error == "building the step failed: OverflowError: Overflow when unpacking long"
    assert outputs["good"].outputs[0].token_ids == alone and outputs["other"].outputs[0].token_ids == other_alone


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_step_that_cannot_be_built_fails_only_the_request_that_breaks_it(tiny_model_dir, alone,
                                                                           async_scheduling):
    engine = LLMEngine.from_workflow(PickyWorkflow, model=tiny_model_dir("qwen3"), num_kv_blocks=32,
                                     max_model_len=64, async_scheduling=async_scheduling)
    engine.add_request("good", [7, 8, 9], GOOD)
    engine.add_request("bad", [5, 13, 6], GOOD)
    engine.add_request("good-2", [7, 8, 9], GOOD)
    outputs = run_bounded(engine)
    assert outputs["bad"].error == "building the step failed: OverflowError: Overflow when unpacking long"
    assert outputs["bad"].internal_error
    assert outputs["good"].outputs[0].token_ids == alone and outputs["good-2"].outputs[0].token_ids == alone
    assert engine.kv_cache_manager.num_free_blocks == 32  # nothing leaked, after the step or later


# 3. seeds: the 64-bit range, by name; seed + index wraps instead of overflowing

@pytest.mark.parametrize("seed", [2**70, -2**70, 2**63])
def test_a_seed_outside_64_bits_is_refused_naming_the_field(seed):
    with pytest.raises(ValidationError, match="seed"):
        SamplingParams(seed=seed)


@pytest.mark.parametrize("seed", [2**63 - 1, -2**63, -1])
def test_extreme_seeds_run_and_are_reproducible(engine, seed):
    params = SamplingParams(n=2, seed=seed, temperature=1.0, max_tokens=5, ignore_eos=True)
    runs = []
    for attempt in range(2):
        engine.add_request(f"seeded-{attempt}", [5, 6], params)
        output = run_bounded(engine)[f"seeded-{attempt}"]
        assert output.error is None
        runs.append([c.token_ids for c in output.outputs])
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]


# 4. floats that break the math: NaN and inf by name; a tiny temperature is greedy

@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                                   "repetition_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("value", [1e-300, 1e-320])
def test_repetition_penalty_that_overflows_the_logits_is_refused(value):
    with pytest.raises(ValidationError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=value)


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 9e-6])
def test_a_tiny_temperature_is_greedy(engine, alone, temperature):
    params = SamplingParams(temperature=temperature, max_tokens=6, ignore_eos=True)
    assert params.greedy
    engine.add_request("tiny-t", [7, 8, 9], params)
    assert run_bounded(engine)["tiny-t"].outputs[0].token_ids == alone


@pytest.mark.parametrize("field,value", [("truncate_prompt_tokens", 0), ("truncate_prompt_tokens", 2**40),
                                         ("dimensions", 2**70)])
def test_pooling_params_bounds_name_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        PoolingParams(**{field: value})


# anything else input processing trips on is a refusal with a message, never another exception type

def test_a_prompt_nested_too_deeply_is_refused(engine):
    nested: list = [5]
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises((ValueError, TypeError), match="prompt|request"):
        engine.add_request("deep", nested, GOOD)
    assert not engine.has_unfinished_requests()


def test_a_failing_output_step_fails_only_that_request(engine, alone, monkeypatch):
    """Detokenizing or a stop check that raises (a bug, or a tokenizer that cannot decode) fails its request."""
    output_processor = engine.output_processor
    real_append = output_processor._append_token

    def append(seq, sampler_output, row):
        if seq.request.request_id == "bad":
            raise KeyError("no such token")
        return real_append(seq, sampler_output, row)
    monkeypatch.setattr(output_processor, "_append_token", append)
    engine.add_request("good", [7, 8, 9], GOOD)
    engine.add_request("bad", [7, 8, 9], GOOD)
    outputs = run_bounded(engine)
    assert outputs["bad"].error == "making the outputs failed: KeyError: 'no such token'"
    assert outputs["good"].outputs[0].token_ids == alone


def test_chat_with_a_bad_message_is_refused_naming_it():
    llm = LLM(max_model_len=128)  # SmolLM2, which has a chat template
    with pytest.raises(ValueError, match=r"message 1's content is not valid Unicode"):
        llm.chat([{"role": "user", "content": "hi"}, {"role": "user", "content": "\ud800"}])
    with pytest.raises(TypeError, match="message 0 is a str"):
        llm.chat([["not a message"]])
    assert len(llm.chat([{"role": "user", "content": "hi"}], GOOD)[0].outputs[0].token_ids) == 6


def test_two_engines_stepping_in_two_threads_do_not_read_each_others_step(tiny_model_dir):
    """`wde serve` runs each engine (a chat model, an embedding model) in a thread of its own: the attention
    metadata of one's forward pass must not be what the other's layers read (it was a module global)."""
    import threading
    chat = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=64, disable_log_stats=True)
    embed = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), task="embed", num_kv_blocks=64,
                                       disable_log_stats=True)
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(8)]
    expected_tokens = [chat_alone(chat, p) for p in prompts]
    expected_vectors = [embed_alone(embed, p) for p in prompts]
    failures = []

    def drive(work):
        try:
            for _ in range(15):
                work()
        except Exception as e:  # noqa: BLE001 - reported below, from the main thread
            failures.append(e)

    def chat_round():
        assert [chat_alone(chat, p) for p in prompts] == expected_tokens

    def embed_round():
        for p, vector in zip(prompts, expected_vectors):
            assert (embed_alone(embed, p) - vector).abs().max() < 1e-5
    threads = [threading.Thread(target=drive, args=(work,)) for work in (chat_round, embed_round)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures


def chat_alone(engine, prompt):
    engine.add_request("chat", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    output = run_bounded(engine)["chat"]
    assert output.error is None, output.error
    return output.outputs[0].token_ids


def embed_alone(engine, prompt):
    engine.add_request("embed", prompt, None)
    output = run_bounded(engine)["embed"]
    assert output.error is None, output.error
    return output.outputs.data


# a failed step must not leave its unwritten blocks in the prefix cache

SHARED = list(range(100, 140))  # 40 tokens: two full blocks of 16


def caching_engine(folder: str, workflow=None, **args) -> LLMEngine:
    args = dict(model=folder, num_kv_blocks=32, max_model_len=128, enable_prefix_caching=True, **args)
    return LLMEngine.from_workflow(workflow, **args) if workflow else LLMEngine.from_engine_args(**args)


def fresh_tokens(folder: str, prompt: list[int]) -> list[int]:
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=32, max_model_len=128)
    engine.add_request("fresh", prompt, GOOD)
    return run_bounded(engine)["fresh"].outputs[0].token_ids


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_failed_forward_pass_leaves_no_unwritten_block_in_the_prefix_cache(tiny_model_dir, async_scheduling):
    folder = tiny_model_dir("qwen3")
    engine = caching_engine(folder, async_scheduling=async_scheduling)
    executor = engine.executor
    real = executor.launch if async_scheduling else executor.execute_model

    def fail_once(model_input):
        setattr(executor, "launch" if async_scheduling else "execute_model", real)
        raise RuntimeError("the device fell over")
    setattr(executor, "launch" if async_scheduling else "execute_model", fail_once)
    engine.add_request("victim", SHARED + [7], GOOD)
    assert "the device fell over" in run_bounded(engine)["victim"].error
    engine.add_request("again", SHARED + [7], GOOD)
    again = run_bounded(engine)["again"]
    assert again.num_cached_tokens == 0  # nothing of the failed step is found in the cache
    assert again.outputs[0].token_ids == fresh_tokens(folder, SHARED + [7])


class SharedPrefixPicky(DecodingModelPreProcessor):
    """Cannot build a step that holds token 13 in a prompt."""

    def __call__(self, scheduler_output):
        if any(13 in s.seq.token_ids[:s.seq.num_prompt_tokens] for s in scheduler_output.scheduled):
            raise OverflowError("Overflow when unpacking long")
        return super().__call__(scheduler_output)


class SharedPrefixPickyWorkflow(ChatWorkflow):
    ModelPreProcessor = f"{__name__}:SharedPrefixPicky"


def test_a_request_whose_cached_prefix_a_failed_request_was_to_compute_fails_too(tiny_model_dir):
    """B is admitted in the same step as A, after it, and finds A's prefix blocks in the cache (they are
    cached as soon as A is given them). A is dropped from the step: those blocks are never written, so B
    cannot run on them, and nobody finds them later."""
    folder = tiny_model_dir("qwen3")
    engine = caching_engine(folder, SharedPrefixPickyWorkflow)
    engine.add_request("a", SHARED + [13], GOOD)
    engine.add_request("b", SHARED + [9], GOOD)
    engine.add_request("other", [7, 8, 9], GOOD)
    assert_b_fails_with_a(engine, folder, "OverflowError", "was to be computed in this step by a request that failed")


def assert_b_fails_with_a(engine: LLMEngine, folder: str, a_error: str, b_error: str) -> None:
    """Requests a and b (on a's prefix) fail, "other" does not, and a later request on that prefix finds
    nothing of theirs in the cache."""
    outputs = run_bounded(engine)
    assert a_error in outputs["a"].error
    assert b_error in outputs["b"].error
    assert outputs["other"].error is None
    engine.add_request("later", SHARED + [9], GOOD)
    later = run_bounded(engine)["later"]
    assert later.num_cached_tokens == 0 and later.outputs[0].token_ids == fresh_tokens(folder, SHARED + [9])
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("host_blocks", [None, 64])
def test_a_request_on_the_prefix_of_a_step_that_fails_after_the_next_launched_fails_too(tiny_model_dir, host_blocks,
                                                                                        monkeypatch):
    """Async scheduling: A's prefill is launched; B, admitted in the next step, finds A's prefix blocks cached
    and is launched on them; then A's step fails as its results are read. B read what the failed step left in
    those blocks: it fails too (found by a helper's attack: it used to finish with wrong tokens). Nothing of
    either is found later, on the device or in the host tier."""
    import wde.core.sampling.sampler as sampler
    folder = tiny_model_dir("qwen3")
    engine = caching_engine(folder, async_scheduling=True, num_kv_offload_blocks=host_blocks)
    real, failing = sampler.PendingSamplerOutput.result, {"once": True}

    def result(self):
        if failing["once"]:
            failing["once"] = False
            raise RuntimeError("the device failed")
        return real(self)
    monkeypatch.setattr(sampler.PendingSamplerOutput, "result", result)
    engine.add_request("a", SHARED + [13], GOOD)
    assert engine.step() == []  # a's prefill launched, its results not read
    engine.add_request("b", SHARED + [9], GOOD)
    engine.add_request("other", [7, 8, 9], GOOD)
    assert_b_fails_with_a(engine, folder, "the device failed", "was to be computed by a step that failed")


def test_a_refused_assignment_leaves_the_params_as_they_were():
    params = SamplingParams(max_tokens=10, stop=["x"])
    with pytest.raises(ValidationError, match="min_tokens=100 is more than max_tokens=10"):
        params.min_tokens = 100
    with pytest.raises(ValidationError, match="stop strings need detokenize=True"):
        params.detokenize = False
    assert params.min_tokens == 0 and params.detokenize


@pytest.mark.parametrize("params,error,match", [
    (PoolingParams(), TypeError, "params must be SamplingParams, a dict of its fields, or a list of one per prompt"),
    ("greedy", TypeError, "not str"), (5, TypeError, "not int"),
    ([SamplingParams(), {"max_tokens": 0}], ValueError, "(?s)prompt 1: .*max_tokens"),
])
def test_llm_names_what_is_wrong_with_its_params(tiny_model_dir, params, error, match):
    llm = LLM(model=tiny_model_dir("qwen3"), num_kv_blocks=16)
    with pytest.raises(error, match=match):
        llm.generate(["w5", "w6"], params, use_tqdm=False)
    assert len(llm.generate("w5", {"max_tokens": 3, "ignore_eos": True}, use_tqdm=False)[0].outputs[0].token_ids) == 3


def test_a_request_id_used_again_right_after_an_early_stop_is_a_new_request(tiny_model_dir, alone):
    """Async scheduling: a sequence that stops on a token (not at its length) was already in the next step,
    still in flight when its request ends. Finishing that step must not end a newer request of the same id."""
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=32, max_model_len=64,
                                        async_scheduling=True)
    stop_early = SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[alone[2]])
    engine.add_request("a", [7, 8, 9], stop_early)
    assert run_bounded(engine)["a"].outputs[0].token_ids == alone[:3]
    assert engine.stepper.in_flight is not None  # the step launched with it, still to be finished
    engine.add_request("a", [7, 8, 9], GOOD)
    assert run_bounded(engine)["a"].outputs[0].token_ids == alone


def test_a_pair_whose_query_alone_is_longer_than_the_cut_is_refused_naming_it(tmp_path):
    """Found by the long fuzz run: the tokenizer's truncation error was an internal failure (a 500)."""
    from tests.encoder_models import write_encoder
    engine = LLMEngine.from_engine_args(model=str(write_encoder(tmp_path, "bert", num_labels=1)), max_model_len=16,
                                        disable_log_stats=True)
    engine.add_request("long-query", ("w5 " * 15, "w2"), PoolingParams(truncate_prompt_tokens=-1))
    engine.add_request("fine", ("what is wde?", "an engine"), None)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step())
    refused = outputs["long-query"]
    assert "only the document can be cut" in refused.error and not refused.internal_error
    assert outputs["fine"].error is None and outputs["fine"].outputs.score is not None
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("task", ["generate", "embed"])
def test_a_step_that_fails_as_its_results_are_read_spares_what_was_aborted_while_it_ran(tiny_model_dir, task,
                                                                                       monkeypatch):
    """Async scheduling: request x is aborted while its step runs and x is submitted again; that step then fails
    when its results are read. The old x gets no output; the new x runs as if nothing had happened."""
    import wde.core.sampling.sampler as sampler
    import wde.workflows.prefill_only.worker as prefill_worker
    embed = task == "embed"
    pending = prefill_worker.PendingPooledOutput if embed else sampler.PendingSamplerOutput
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), task=task, num_kv_blocks=64)
    params = PoolingParams() if embed else SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    real, failing = pending.result, {"once": False}

    def result(self):
        if failing["once"]:
            failing["once"] = False
            raise RuntimeError("the device failed")
        return real(self)
    monkeypatch.setattr(pending, "result", result)
    engine.add_request("x", [5, 6, 7], params)
    assert engine.step() == []  # x's first step launched, its results not read
    engine.abort_request("x")
    engine.add_request("x", [8, 9, 10], params)
    failing["once"] = True
    outputs = run_bounded(engine)
    assert list(outputs) == ["x"] and outputs["x"].error is None and outputs["x"].prompt_token_ids == [8, 9, 10]
    assert_all_blocks_free(engine)
