"""Weights from every supported source give the same model: sharded safetensors, .gguf files (read once, then
from the cache)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import run_to_completion
from tests.gguf_export import export_gguf
from tests.test_parity_random import random_prompts
from wde import LLMEngine, SamplingParams
from wde.core.loader import gguf_cache

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
                                             ("qwen3", {"tie_word_embeddings": False}),
                                             ("qwen3_moe", {"mlp_only_layers": []}), ("qwen2_moe", {}),
                                             ("mixtral", {}), ("phi3", {}),
                                             ("gemma2", {"query_pre_attn_scalar": 16}),
                                             ("gemma3", {"query_pre_attn_scalar": 16})])
def test_gguf_file_loads_the_same_model_as_safetensors(tiny_model_dir, tmp_path, shape, overrides):
    """Qwen3's head_dim and q/k norms, Qwen2's biases, Llama's permuted q/k rows and rope_freqs (llama3 RoPE
    scaling), tied and untied heads; the mixtures of experts' stacked experts, their sizes and renormalization
    (Qwen3-MoE's on, Qwen2-MoE's off), Qwen2-MoE's shared expert, Mixtral as llama.cpp's "llama" with experts
    (every layer sparse: llama.cpp has no dense layers in Qwen3-MoE); Phi-3's fused tensors and its LongRoPE
    factors, which llama.cpp keeps as tensors; Gemma's norms with their 1 added, its pre- and post-norms, soft
    caps (Gemma 2), local and global RoPE (Gemma 3's global base and linear factor from the file) and the query
    scale llama.cpp derives (head_dim, as the tiny shapes are set to here)."""
    folder = tiny_model_dir(shape, **overrides)
    gguf_file = export_gguf(Path(folder), tmp_path / f"{shape}.gguf")
    from_gguf = generate(str(gguf_file), tokenizer=folder)
    from_safetensors = generate(folder)
    assert [c.token_ids for c in from_gguf] == [c.token_ids for c in from_safetensors]
    for a, b in zip(from_gguf, from_safetensors):
        ours = torch.tensor([step[t].logprob for step, t in zip(a.logprobs, a.token_ids)])
        theirs = torch.tensor([step[t].logprob for step, t in zip(b.logprobs, b.token_ids)])
        assert (ours - theirs).abs().max() < 1e-5


def test_gguf_experts_keys_missing_are_named_or_read_from_the_tensors(tiny_model_dir, tmp_path, monkeypatch):
    """Without expert_used_count a mixture cannot be run as its author meant: refused by the key's name; without
    the shared expert's size (expert_shared_feed_forward_length), it is read from the shared expert's tensor."""
    import gguf
    folder = tiny_model_dir("qwen2_moe")
    monkeypatch.setattr(gguf.GGUFWriter, "add_expert_shared_feed_forward_length", lambda self, value: None)
    gguf_file = export_gguf(Path(folder), tmp_path / "no-shared-size.gguf")
    assert [c.token_ids for c in generate(str(gguf_file), tokenizer=folder)] == [c.token_ids
                                                                                 for c in generate(folder)]
    monkeypatch.setattr(gguf.GGUFWriter, "add_expert_used_count", lambda self, value: None)
    gguf_file = export_gguf(Path(tiny_model_dir("qwen3_moe", mlp_only_layers=[])), tmp_path / "no-top-k.gguf")
    with pytest.raises(ValueError, match="qwen3moe.expert_used_count .the experts a token takes. is missing"):
        generate(str(gguf_file), tokenizer=folder)


def test_a_gguf_window_reaches_the_config(tiny_model_dir, tmp_path):
    """attention.sliding_window, which transformers does not read from the file: a window shorter than the
    sequences gives the tokens of the same window read from an HF folder, and not those of no window."""
    folder = tiny_model_dir("phi3", sliding_window=3)
    gguf_file = export_gguf(Path(folder), tmp_path / "windowed.gguf")
    windowed = [c.token_ids for c in generate(folder)]
    assert [c.token_ids for c in generate(str(gguf_file), tokenizer=folder)] == windowed
    assert [c.token_ids for c in generate(tiny_model_dir("phi3"))] != windowed


def test_a_gguf_file_is_parsed_once_and_a_changed_file_again(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WDE_CACHE_DIR", str(tmp_path / "cache"))
    folder = tiny_model_dir("qwen3")
    gguf_file = export_gguf(Path(folder), tmp_path / "model.gguf")
    first = generate(str(gguf_file), tokenizer=folder)
    [entry] = (tmp_path / "cache" / "gguf").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["config"]  # the tokenizer came from the folder
    opened = []
    monkeypatch.setattr(gguf_cache.gguf, "GGUFReader", lambda path: opened.append(path))
    again = generate(str(gguf_file), tokenizer=folder)
    assert opened == []  # config and weights from the cache's table, not from parsing the file
    assert [c.token_ids for c in again] == [c.token_ids for c in first]
    os.utime(gguf_file, ns=(1, 1))  # a changed file is read anew
    with pytest.raises(ValueError, match="model.gguf"):  # the stand-in reader gives None: it was asked
        generate(str(gguf_file), tokenizer=folder)
    assert opened and {str(path) for path in opened} == {str(gguf_file)}


def test_the_smollm2_tokenizer_from_the_cache_is_the_files(smollm2_path, hf_smollm2):
    from transformers import AutoTokenizer
    cached = AutoTokenizer.from_pretrained(gguf_cache.tokenizer_folder(smollm2_path))
    _, reference = hf_smollm2
    text = "Héllo <|im_start|>user\n wörld 🙂 1234\t\n"
    assert cached(text)["input_ids"] == reference(text)["input_ids"]
    assert cached.get_vocab() == reference.get_vocab()
    assert cached.chat_template == reference.chat_template
    assert cached.all_special_ids == reference.all_special_ids


def test_an_unwritable_cache_falls_back_to_a_temporary_folder(tiny_model_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("WDE_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be made
    monkeypatch.setattr(gguf_cache, "_fallback_root", None)
    folder = tiny_model_dir("llama")
    gguf_file = export_gguf(Path(folder), tmp_path / "model.gguf")
    assert [c.token_ids for c in generate(str(gguf_file), tokenizer=folder)] == \
           [c.token_ids for c in generate(folder)]
    assert Path(gguf_cache.config_folder(str(gguf_file))).is_relative_to(gguf_cache._fallback_root)


def test_a_corrupt_gguf_file_leaves_no_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("WDE_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ValueError, match="broken.gguf"):
        LLMEngine.from_engine_args(model=str(bad))
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_a_file_copied_over_with_its_mtime_kept_is_read_anew(tiny_model_dir, tmp_path, monkeypatch):
    """rsync -a and cp -p keep the modification time: the cache must not serve the old file's table."""
    monkeypatch.setenv("WDE_CACHE_DIR", str(tmp_path / "cache"))
    first, second = tiny_model_dir("qwen3"), tiny_model_dir("qwen3", seed=1)
    served = tmp_path / "model.gguf"
    export_gguf(Path(first), served)
    generate(str(served), tokenizer=first)
    other = export_gguf(Path(second), tmp_path / "other.gguf")
    before = served.stat()
    shutil.copyfile(other, served)
    os.utime(served, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert served.stat().st_size == before.st_size and served.stat().st_mtime_ns == before.st_mtime_ns
    assert [c.token_ids for c in generate(str(served), tokenizer=first)] == \
           [c.token_ids for c in generate(second, tokenizer=first)]


def test_a_damaged_cache_entry_is_made_again(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WDE_CACHE_DIR", str(tmp_path / "cache"))
    folder = tiny_model_dir("llama")
    gguf_file = export_gguf(Path(folder), tmp_path / "model.gguf")
    expected = [c.token_ids for c in generate(str(gguf_file), tokenizer=folder)]
    table = Path(gguf_cache.config_folder(str(gguf_file))) / "tensors.json"
    table.write_text(table.read_text()[:100])  # half-written
    assert [c.token_ids for c in generate(str(gguf_file), tokenizer=folder)] == expected
    assert json.loads(table.read_text())  # whole again


def test_a_gguf_file_named_relative_to_the_current_folder(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WDE_CACHE_DIR", str(tmp_path / "cache"))
    folder = tiny_model_dir("qwen2")
    export_gguf(Path(folder), tmp_path / "model.gguf")
    monkeypatch.chdir(tmp_path)
    assert [c.token_ids for c in generate("model.gguf", tokenizer=folder)] == \
           [c.token_ids for c in generate(folder)]
