"""EmbeddingGemma's architecture (Gemma3TextModel with use_bidirectional_attention) on the encoder path: its
embeddings equal transformers' hidden states through the sentence-transformers pipeline it ships (mean pooling,
two dense layers, normalization), with local layers windowed on both sides."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModel, Gemma3TextConfig

from tests.test_parity_random import random_prompts
from tests.tiny_models import EOS_ID, VOCAB_SIZE
from wde import LLM, PoolingParams
from wde.core.loader.dummy_model import write_word_level_tokenizer

HIDDEN, DENSE = 64, 96
WINDOW = 4  # shorter than the inputs: a local layer's token sees 3 positions on either side


def write_embedding_gemma(folder, bidirectional: bool = True) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    config = Gemma3TextConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                              vocab_size=VOCAB_SIZE, eos_token_id=EOS_ID, initializer_range=0.2,
                              use_bidirectional_attention=bidirectional, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModel.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(folder)
    write_word_level_tokenizer(folder, VOCAB_SIZE, EOS_ID)
    dense = [torch.randn(DENSE, HIDDEN) / HIDDEN ** 0.5, torch.randn(HIDDEN, DENSE) / DENSE ** 0.5]
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
               {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"},
               {"idx": 4, "name": "4", "path": "4_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": HIDDEN,
                                                                  "pooling_mode_mean_tokens": True}))
    for path, weight in zip(("2_Dense", "3_Dense"), dense):
        (folder / path).mkdir()
        (folder / path / "config.json").write_text(json.dumps({
            "in_features": weight.shape[1], "out_features": weight.shape[0], "bias": False,
            "activation_function": "torch.nn.modules.linear.Identity"}))
        save_file({"linear.weight": weight.contiguous()}, folder / path / "model.safetensors")
    return model, dense


def test_embeddings_equal_transformers_through_the_sentence_transformers_pipeline(tmp_path):
    model, dense = write_embedding_gemma(tmp_path)
    prompts = random_prompts([3, 9, 20, 33], seed=2)
    llm = LLM(model=str(tmp_path), max_num_batched_tokens=64, dtype="float32")  # float32 on a GPU too
    assert llm.engine.config.model.task == "embed"
    outputs = llm.embed(prompts)
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            hidden = model(torch.tensor([prompt])).last_hidden_state[0]
        reference = F.normalize(hidden.mean(0) @ dense[0].T @ dense[1].T, dim=0)
        assert (output.outputs.data - reference).abs().max() < 1e-4


def test_a_causal_gemma3_text_model_is_sent_to_the_decoder_class(tmp_path):
    write_embedding_gemma(tmp_path, bidirectional=False)
    with pytest.raises(ValueError, match="without use_bidirectional_attention is a causal decoder"):
        LLM(model=str(tmp_path))


def break_dense_chain(folder):
    save_file({"linear.weight": torch.randn(HIDDEN, 80)}, folder / "3_Dense" / "model.safetensors")


def rename_dense_weight(folder):
    save_file({"weight": torch.randn(HIDDEN, DENSE)}, folder / "3_Dense" / "model.safetensors")


def garble_modules(folder):
    (folder / "modules.json").write_text("{not json")


def modules_as_an_object(folder):
    (folder / "modules.json").write_text(json.dumps({"0": "Transformer"}))


def dense_without_pooling(folder):
    modules = [m for m in json.loads((folder / "modules.json").read_text()) if not m["type"].endswith("Pooling")]
    (folder / "modules.json").write_text(json.dumps(modules))


# each broken at load, naming what is wrong (found by the helper's attack: some failed every request instead)
@pytest.mark.parametrize("damage,message", [
    (break_dense_chain, r"3_Dense: a Dense of weight \[64, 80\] cannot take the 96 values before it"),
    (rename_dense_weight, r"3_Dense/model.safetensors has no linear.weight \(it holds weight\)"),
    (garble_modules, r"modules.json: not a readable JSON file"),
    (modules_as_an_object, r"modules.json: holds a dict, not a JSON list"),
    (dense_without_pooling, r"modules.json: a Dense module before any Pooling module")])
def test_a_broken_sentence_transformers_pipeline_is_refused_at_load(tmp_path, damage, message):
    write_embedding_gemma(tmp_path)
    damage(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        LLM(model=str(tmp_path))


def test_dimensions_are_checked_against_the_last_dense_layer(tmp_path):
    write_embedding_gemma(tmp_path)
    save_file({"linear.weight": torch.randn(32, DENSE)}, tmp_path / "3_Dense" / "model.safetensors")
    llm = LLM(model=str(tmp_path), dtype="float32")
    assert llm.embed([[5, 6, 7]], PoolingParams(dimensions=16))[0].outputs.data.shape == (16,)
    assert llm.embed([[5, 6, 7]])[0].outputs.data.shape == (32,)
    with pytest.raises(ValueError, match="dimensions=48 is more than the model's 32"):
        llm.embed([[5, 6, 7]], PoolingParams(dimensions=48))
