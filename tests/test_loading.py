"""Weights from every supported source give the same model: sharded safetensors, .gguf files."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import run_to_completion
from tests.gguf_export import export_gguf
from tests.test_parity_random import random_prompts
from wde import LLMEngine, SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)


def generate(model: str, **engine_args) -> list:
    engine = LLMEngine.from_engine_args(model=model, num_kv_blocks=32, **engine_args)
    for i, prompt in enumerate(random_prompts([7, 23, 40], seed=3)):
        engine.add_request(str(i), prompt, PARAMS)
    outputs = run_to_completion(engine)
    return [outputs[str(i)].outputs[0] for i in range(3)]


def test_sharded_safetensors_with_an_index(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{folder}/{name}", sharded / name)
    shards = set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 2
    assert [c.token_ids for c in generate(str(sharded))] == [c.token_ids for c in generate(folder)]


def test_a_shard_missing_from_the_index_is_named(tiny_model_dir, tmp_path):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).save_pretrained(sharded, max_shard_size="100KB")
    victim = sorted(sharded.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        LLMEngine.from_engine_args(model=str(sharded), tokenizer=tiny_model_dir("llama"), num_kv_blocks=8)


@pytest.mark.parametrize("shape,overrides", [("qwen3", {}), ("qwen2", {}), ("llama", {}),
                                             ("qwen3", {"tie_word_embeddings": False})])
def test_gguf_file_loads_the_same_model_as_safetensors(tiny_model_dir, tmp_path, shape, overrides):
    """Qwen3's head_dim and q/k norms, Qwen2's biases, Llama's permuted q/k rows and rope_freqs (llama3 RoPE
    scaling), tied and untied heads."""
    folder = tiny_model_dir(shape, **overrides)
    gguf_file = export_gguf(__import__("pathlib").Path(folder), tmp_path / f"{shape}.gguf")
    from_gguf = generate(str(gguf_file), tokenizer=folder)
    from_safetensors = generate(folder)
    assert [c.token_ids for c in from_gguf] == [c.token_ids for c in from_safetensors]
    for a, b in zip(from_gguf, from_safetensors):
        ours = torch.tensor([step[t].logprob for step, t in zip(a.logprobs, a.token_ids)])
        theirs = torch.tensor([step[t].logprob for step, t in zip(b.logprobs, b.token_ids)])
        assert (ours - theirs).abs().max() < 1e-5
