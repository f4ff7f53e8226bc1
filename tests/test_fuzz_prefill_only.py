"""Fuzzing the prefill-only engines (an encoder embedder, a decoder embedder on the paged KV cache with prefix
caching, a cross-encoder scorer) with arbitrary inputs and PoolingParams mixed with good inputs: the good
ones get the results they get alone, each bad one is refused with a message or fails alone (never blamed on
the engine), and the engine ends idle with every KV block free."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.encoder_models import write_encoder
from tests.fuzz import POOLING_FIELDS, Shared, any_value, count_case, fuzz_settings, params, prompts
from tests.test_fuzz_engine import assert_failed_alone, finish
from tests.tiny_models import VOCAB_SIZE
from wde import LLMEngine
from wde.core.config import default_embed_model_path

MAX_MODEL_LEN = 32
GOOD = {"good-ids": [101, 2023, 2003, 102], "good-text": "a short sentence"}  # WordPiece ids of MiniLM


def embedders(kind: str, tiny_model_dir) -> LLMEngine:
    if kind == "encoder":  # all-MiniLM-L6-v2: no KV cache
        return LLMEngine.from_engine_args(model=default_embed_model_path(), max_model_len=MAX_MODEL_LEN,
                                          max_num_batched_tokens=64, max_num_seqs=4, disable_log_stats=True)
    return LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), task="embed", num_kv_blocks=8, block_size=16,
                                      max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=64, max_num_seqs=4,
                                      enable_prefix_caching=True, disable_log_stats=True)


@pytest.fixture(scope="module", params=["encoder", "decoder"])
def embedder(request, tiny_model_dir):
    engine = embedders(request.param, tiny_model_dir)
    vocab_size = engine.config.model.vocab_size
    good = {rid: [t % vocab_size for t in p] if isinstance(p, list) else p for rid, p in GOOD.items()}
    expected = {}
    for request_id, prompt in good.items():
        engine.add_request(request_id, prompt, None)
        expected[request_id] = finish(engine, {request_id})[request_id].outputs.data
    return Shared(engine=engine, good=good, expected=expected)


def run_case(engine: LLMEngine, good: dict, bad: list) -> dict:
    accepted = set()
    for request_id, prompt, request_params in [(rid, p, None) for rid, p in good.items()] + \
            [(f"bad-{i}", prompt, p) for i, (prompt, p) in enumerate(bad)]:
        try:
            engine.add_request(request_id, prompt, request_params)
        except (ValueError, TypeError) as e:
            assert request_id.startswith("bad-") and str(e).strip(), f"refused with no message: {e!r}"
            continue
        accepted.add(request_id)
    outputs = finish(engine, accepted)
    assert set(outputs) == accepted
    for request_id, output in outputs.items():
        if not request_id.startswith("bad-"):
            assert output.error is None
        else:
            assert_failed_alone(request_id, output)
            assert (output.error is None) == (output.outputs is not None)
    return outputs


@fuzz_settings(ci_examples=60)
@given(data=st.data())
def test_embedding_inputs_fail_alone(embedder, data):
    count_case("prefill-only: embedding inputs")
    engine, good, expected = embedder.engine, embedder.good, embedder.expected
    vocab_size = engine.config.model.vocab_size
    bad = data.draw(st.lists(st.tuples(prompts(vocab_size, MAX_MODEL_LEN), params(POOLING_FIELDS)),
                             min_size=1, max_size=4))
    outputs = run_case(engine, good, bad)
    for request_id, vector in expected.items():
        assert torch.allclose(outputs[request_id].outputs.data, vector, atol=1e-5)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    folder = write_encoder(tmp_path_factory.mktemp("cross-encoder"), "bert", num_labels=1)
    engine = LLMEngine.from_engine_args(model=str(folder), max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=64,
                                        max_num_seqs=4, disable_log_stats=True)
    good = {"good-pair": ("what is wde?", "an inference engine")}
    engine.add_request("good-pair", good["good-pair"], None)
    return Shared(engine=engine, good=good, score=finish(engine, {"good-pair"})["good-pair"].outputs.score)


@fuzz_settings(ci_examples=60)
@given(bad=st.lists(st.tuples(st.one_of(st.tuples(prompts(VOCAB_SIZE, MAX_MODEL_LEN),
                                                   prompts(VOCAB_SIZE, MAX_MODEL_LEN)), any_value),
                              params(POOLING_FIELDS)), min_size=1, max_size=4))
def test_scoring_pairs_fail_alone(scorer, bad):
    count_case("prefill-only: scoring pairs")
    engine, good, score = scorer.engine, scorer.good, scorer.score
    outputs = run_case(engine, good, bad)
    assert outputs["good-pair"].outputs.score == pytest.approx(score, abs=1e-6)
