"""Decoders used for one pass (random Qwen2 / Qwen3 / MoE shapes): last-token embeddings and yes/no reranking against
transformers, on the paged KV cache with prefix caching."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tests.test_parity_random import random_prompts
from wde import LLM, PoolingParams
from wde.tasks.rerank.pooler import YesNoPooler
from wde.tasks.rerank.workflow import DecoderRerankWorkflow


class WordYesNoPooler(YesNoPooler):
    tokens = ("w7", "w8")  # the tiny models' word-level vocabulary has no "yes" / "no"


class TinyRerankWorkflow(DecoderRerankWorkflow):
    Pooler = f"{__name__}:WordYesNoPooler"


def reference_last_hidden(folder: str, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden state of the last token, its logits) from transformers."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([token_ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1], out.logits[0, -1]


@pytest.mark.parametrize("shape,overrides", [("qwen2", {}), ("qwen3", {}), ("qwen3_moe", {}), ("mixtral", {}),
                                             ("gemma2", {}), ("gemma3", {}), ("mistral", {"sliding_window": 9})])
def test_last_token_embeddings_match_transformers(tiny_model_dir, shape, overrides):
    """Gemma's and Mistral's windows too, over inputs longer than them (prefilled in chunks of 128)."""
    folder = tiny_model_dir(shape, **overrides)
    prompts = random_prompts([5, 40, 17, 90], seed=11)
    llm = LLM(model=folder, task="embed", num_kv_blocks=64, max_num_batched_tokens=128)
    normalized = llm.embed(prompts)
    raw = llm.embed(prompts, PoolingParams(normalize=False))
    for prompt, unit, vector in zip(prompts, normalized, raw):
        reference, _ = reference_last_hidden(folder, prompt)
        assert (vector.outputs.data - reference).abs().max() < 1e-4
        assert (unit.outputs.data - F.normalize(reference, dim=0)).abs().max() < 1e-5


def rerank_engine(folder: str, **args) -> LLM:
    """An LLM over the tiny models' workflow, named by its dotted path."""
    return LLM(model=folder, workflow=f"{__name__}:TinyRerankWorkflow", task="score", **args)


def test_yes_no_scores_match_transformers(tiny_model_dir):
    folder = tiny_model_dir("qwen3")
    query, documents = random_prompts([30], seed=12)[0], random_prompts([4, 25, 9], seed=13)
    outputs = rerank_engine(folder, num_kv_blocks=64).score(query, documents)
    yes, no = 7, 8
    for document, output in zip(documents, outputs):
        _, logits = reference_last_hidden(folder, query + document)
        assert output.outputs.score == pytest.approx(torch.softmax(logits[[yes, no]], 0)[0].item(), abs=1e-5)


def test_one_long_query_against_100_passages_is_prefilled_once(tiny_model_dir):
    folder = tiny_model_dir("qwen3")
    query = random_prompts([192], seed=14)[0]  # 12 full blocks of 16
    passages = [random_prompts([n], seed=100 + n)[0] for n in range(5, 105)]
    cached_llm = rerank_engine(folder, num_kv_blocks=512, enable_prefix_caching=True)
    cached = cached_llm.score(query, passages)
    plain_llm = rerank_engine(folder, num_kv_blocks=512)
    plain = plain_llm.score(query, passages)
    assert [o.outputs.score for o in cached] == pytest.approx([o.outputs.score for o in plain], abs=1e-5)
    computed = cached_llm.engine.get_stats().num_prompt_tokens
    assert computed == len(query) + sum(map(len, passages))  # the query once, each passage once
    assert plain_llm.engine.get_stats().num_prompt_tokens == 100 * len(query) + sum(map(len, passages))
    assert [o.num_cached_tokens for o in cached] == [0] + [192] * 99


def test_embeddings_with_a_shared_instruction_are_the_same_with_prefix_caching(tiny_model_dir):
    folder = tiny_model_dir("qwen2")
    instruction = random_prompts([64], seed=15)[0]
    texts = [instruction + t for t in random_prompts([3, 30, 12, 7], seed=16)]
    with_cache = LLM(model=folder, task="embed", num_kv_blocks=64, enable_prefix_caching=True)
    first = with_cache.embed(texts)
    again = with_cache.embed(texts)  # now every instruction block, and the whole of each text, is cached
    plain = LLM(model=folder, task="embed", num_kv_blocks=64).embed(texts)
    for a, b, c in zip(first, again, plain):
        assert (a.outputs.data - c.outputs.data).abs().max() < 1e-5
        assert (b.outputs.data - c.outputs.data).abs().max() < 1e-5
    assert [o.num_cached_tokens for o in again] == [64, 80, 64, 64]


def test_a_reranker_whose_yes_and_no_are_the_same_token_is_refused(tiny_model_dir):
    """The tiny models' word-level vocabulary reads both "yes" and "no" as <unk>: every score would be 0.5."""
    with pytest.raises(ValueError, match=r"must be one token each, and two tokens; they are \[\[0\], \[0\]\]"):
        LLM(model=tiny_model_dir("qwen3"), task="score", num_kv_blocks=16)
