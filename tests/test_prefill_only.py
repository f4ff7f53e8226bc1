"""The prefill-only workflow family: lazy tokenization, truncation, refusals, and the API's task checks."""
import pytest
from pydantic import ValidationError

from tests.conftest import run_to_completion
from wde import LLM, LLMEngine, PoolingParams
from wde.core.config import default_embed_model_path


@pytest.fixture(scope="module")
def embed_llm():
    return LLM(model=default_embed_model_path(), max_model_len=32, max_num_batched_tokens=64)


class CountingTokenizer:
    def __init__(self, hf):
        self.hf_tokenizer, self.calls = hf, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.hf_tokenizer(*args, **kwargs)


def test_submitting_100000_texts_tokenizes_none_of_them(embed_llm):
    engine = embed_llm.engine
    counting = CountingTokenizer(engine.tokenizer.hf)
    engine.request_processor.tokenizer.hf = counting
    try:
        for i in range(100_000):
            engine.add_request(f"bulk-{i}", f"text number {i}", None)
        assert counting.calls == 0
        outputs = engine.step()  # launches the first step; its outputs come with the next one (async scheduling)
        first_step = counting.calls
        outputs += engine.step()
        # only what one step of 64 tokens holds, and the next input, tokenized to learn it did not fit
        assert 0 < len(outputs) <= first_step <= len(outputs) + 1 < 100
        assert counting.calls < 2 * first_step + 2
        for i in range(100_000):
            engine.abort_request(f"bulk-{i}")
        assert engine.step() == [] and not engine.has_unfinished_requests()
    finally:
        engine.request_processor.tokenizer.hf = counting.hf_tokenizer


def test_an_input_over_max_model_len_is_refused_unless_truncation_is_asked(embed_llm):
    long_text = "word " * 100
    refused, short = embed_llm.embed([long_text, "short"])
    assert refused.outputs is None and "more than max_model_len=32" in refused.error
    assert "truncate_prompt_tokens" in refused.error and short.outputs is not None
    cut = embed_llm.embed(long_text, PoolingParams(truncate_prompt_tokens=20))[0]
    assert len(cut.prompt_token_ids) == 20 and cut.prompt_token_ids[-1] == 102  # [SEP] kept
    assert len(embed_llm.embed(long_text, PoolingParams(truncate_prompt_tokens=-1))[0].prompt_token_ids) == 32


@pytest.mark.parametrize("field,value", [("dimensions", 0), ("truncate_prompt_tokens", -2), ("normalize", "sometimes"),
                                         ("activation", "maybe"), ("pool", "mean")])
def test_invalid_pooling_params_name_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        PoolingParams(**{field: value})


@pytest.mark.parametrize("prompt,params,error,match", [
    ("", None, ValueError, "the prompt is empty"),
    ([5, 999999], None, ValueError, "outside the vocabulary"),
    ("text", PoolingParams(dimensions=1000), ValueError, "dimensions=1000 is more than the model's 384"),
    ("text", object(), TypeError, "params must be PoolingParams"),
])
def test_bad_inputs_are_refused_and_the_engine_keeps_serving(embed_llm, prompt, params, error, match):
    engine = embed_llm.engine
    with pytest.raises(error, match=match):
        engine.add_request("bad", prompt, params)
    engine.add_request("good", "still serving", None)
    assert run_to_completion(engine)["good"].outputs is not None


def test_the_api_checks_the_task(embed_llm, tiny_model_dir):
    with pytest.raises(ValueError, match="served for 'embed'.*not 'generate'"):
        embed_llm.generate("hello")
    with pytest.raises(ValueError, match="not 'score'"):
        embed_llm.score("query", ["document"])
    chat = LLM(model=tiny_model_dir("qwen3"), num_kv_blocks=8)
    with pytest.raises(ValueError, match="served for 'generate'.*pass task='embed'"):
        chat.embed("hello")


def test_scoring_input_shapes(tiny_model_dir, tmp_path):
    from tests.encoder_models import write_encoder
    folder = str(write_encoder(tmp_path / "ce", "bert", num_labels=1))
    llm = LLM(model=folder)
    with pytest.raises(ValueError, match="2 queries for 3 documents"):
        llm.score(["q1", "q2"], ["a", "b", "c"])
    assert len(llm.score(["q1", "q2"], ["a", "b"])) == 2
    engine = llm.engine
    with pytest.raises(TypeError, match=r"a \(query, document\) tuple"):
        engine.add_request("x", "just text", None)
    engine.add_request("ids", ([101, 2000], [2001, 102]), None)
    failed = run_to_completion(engine)["ids"]
    assert "scores text pairs" in failed.error
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=4)
    assert engine.workflow.__name__ == "CrossEncoderWorkflow"


def test_overlapped_steps_give_the_results_of_synchronous_ones_and_skip_what_was_aborted_in_flight():
    texts = [f"sentence {i} " * (1 + i % 5) for i in range(40)]
    params = [PoolingParams(normalize=i % 3 != 0, dimensions=None if i % 2 else 8) for i in range(40)]
    results = {}
    for overlapped in (False, True):
        llm = LLM(model=default_embed_model_path(), max_num_batched_tokens=64, async_scheduling=overlapped)
        assert llm.engine.config.args.async_scheduling is overlapped
        results[overlapped] = llm.embed(texts, params)
    for sync, overlapped in zip(results[False], results[True]):
        assert sync.outputs.data.shape == overlapped.outputs.data.shape
        assert (sync.outputs.data - overlapped.outputs.data).abs().max() < 1e-6

    engine = llm.engine
    for i, text in enumerate(texts):
        engine.add_request(str(i), text, None)
    assert engine.step() == []  # the first step is launched, its results not read yet
    in_flight = [item.seq.request_id for item in engine.stepper.in_flight[0].scheduled]
    engine.abort_request(in_flight[0])
    outputs = run_to_completion(engine)
    assert in_flight[0] not in outputs and len(outputs) == len(texts) - 1
    assert all(output.outputs is not None for output in outputs.values())


def test_an_id_aborted_in_flight_can_be_used_again_at_once():
    engine = LLMEngine.from_engine_args(model=default_embed_model_path(), max_num_batched_tokens=64)
    engine.add_request("same", "first text", None)
    assert engine.step() == []
    engine.abort_request("same")
    engine.add_request("same", "second text", None)
    outputs = run_to_completion(engine)
    alone = LLM(model=default_embed_model_path()).embed(["second text"])[0]
    assert list(outputs) == ["same"] and (outputs["same"].outputs.data - alone.outputs.data).abs().max() < 1e-6


def test_an_input_aborted_while_it_waited_does_not_run_for_the_new_request_of_its_id():
    engine = LLMEngine.from_engine_args(model=default_embed_model_path(), max_num_batched_tokens=64)
    engine.add_request("same", "first text", None)
    engine.abort_request("same")  # still in the queue, untokenized
    engine.add_request("same", "second text", None)
    outputs = run_to_completion(engine)
    alone = LLM(model=default_embed_model_path()).embed(["second text"])[0]
    assert list(outputs) == ["same"] and (outputs["same"].outputs.data - alone.outputs.data).abs().max() < 1e-6
