"""Bad models and bad requests get clear errors, and a bad request never stops the others."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from tests.conftest import assert_all_blocks_free, run_to_completion
from wde import LLM, LLMEngine, SamplingParams
from wde.core import registry

GOOD = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture
def engine(tiny_model_dir):
    return LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=32, max_model_len=64)


def copy_model(tiny_model_dir, tmp_path, shape="qwen3"):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir(shape), folder)
    return folder


def test_unknown_architecture(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["MysteryForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'MysteryForCausalLM' is not supported; supported: .*Qwen3ForCausalLM"):
        LLMEngine.from_engine_args(model=str(folder))


def test_missing_model_folder():
    with pytest.raises(FileNotFoundError, match="does-not-exist.*does not exist"):
        LLMEngine.from_engine_args(model="/tmp/does-not-exist")


def test_folder_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLMEngine.from_engine_args(model=str(tmp_path))


def test_corrupt_safetensors_file(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 100)
    with pytest.raises(ValueError, match="could not read weights from .*model.safetensors"):
        LLMEngine.from_engine_args(model=str(folder), num_kv_blocks=8)


def test_checkpoint_missing_a_tensor(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = copy_model(tiny_model_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks weights .*layers.1.mlp.gate_up_proj"):
        LLMEngine.from_engine_args(model=str(folder), num_kv_blocks=8)


def rewrite_tensors(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("shape,name,bad_shape", [
    ("qwen3", "model.layers.0.mlp.gate_proj.weight", (129, 64)),
    ("qwen3", "model.layers.0.self_attn.o_proj.weight", (64, 130)),
    ("qwen3_moe", "model.layers.0.mlp.experts.2.gate_proj.weight", (33, 64)),
    ("qwen3_moe", "model.layers.0.mlp.experts.2.down_proj.weight", (64, 33)),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.1.w2.weight", (64, 65))])
def test_a_tensor_larger_than_its_parameter_is_refused_by_name(tiny_model_dir, tmp_path, shape, name, bad_shape):
    """A rank keeps a slice of most tensors: one too large must not load cut to size. (Mixtral's tensors are
    named as its model renames them, block_sparse_moe as mlp.)"""
    folder = copy_model(tiny_model_dir, tmp_path, shape)
    rewrite_tensors(folder, lambda tensors: tensors.update({name: torch.zeros(bad_shape)}))
    named = name.replace(".block_sparse_moe.", ".mlp.")
    with pytest.raises(ValueError, match=f"cannot load checkpoint tensor '{re.escape(named)}'.*has shape "
                                         f"{re.escape(str(bad_shape))}, the model takes"):
        LLMEngine.from_engine_args(model=str(folder), num_kv_blocks=8)


def test_a_missing_expert_and_too_many_experts_a_token_are_named(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path, "qwen3_moe")
    rewrite_tensors(folder, lambda tensors: tensors.pop("model.layers.2.mlp.experts.3.gate_proj.weight"))
    with pytest.raises(ValueError, match=re.escape("layers.2.mlp.experts.w13 [(3, 'gate')]")):
        LLMEngine.from_engine_args(model=str(folder), num_kv_blocks=8)
    with pytest.raises(ValueError, match="num_experts_per_tok=5: a token takes 1 to 4 experts"):
        LLMEngine.from_engine_args(model=tiny_model_dir("mixtral", num_experts_per_tok=5), num_kv_blocks=8)


def test_corrupt_gguf_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ValueError, match="broken.gguf"):
        LLMEngine.from_engine_args(model=str(bad))


@pytest.mark.parametrize("prompt,error,match", [
    ("", ValueError, "the prompt is empty"),
    ([], ValueError, "the prompt is empty"),
    ([3, -1], ValueError, "prompt token 1 is -1, outside the vocabulary"),
    ([3, 512], ValueError, "prompt token 1 is 512, outside the vocabulary"),
    ([3, "x"], TypeError, "prompt token 1 is 'x', not an int"),
    (3.5, TypeError, "a prompt must be a str or a list of token ids"),
    ({"text": "w5"}, ValueError, "exactly one key"),
    (list(range(2, 70)), ValueError, "68 tokens; it must be shorter than max_model_len=64"),
])
def test_bad_prompt_is_refused_and_the_engine_keeps_serving(engine, prompt, error, match):
    engine.add_request("good-1", [5, 6, 7], GOOD)
    with pytest.raises(error, match=match):
        engine.add_request("bad", prompt, GOOD)
    engine.add_request("good-2", "w8 w9", GOOD)
    outputs = run_to_completion(engine)
    assert sorted(outputs) == ["good-1", "good-2"]
    assert all(len(o.outputs[0].token_ids) == 5 for o in outputs.values())


def test_text_prompt_too_long_fails_alone_once_tokenized(engine):
    engine.add_request("good", "w5 w6", GOOD)
    engine.add_request("long", " ".join(f"w{i}" for i in range(2, 80)), GOOD)
    engine.add_request("good-2", [9, 10, 11], GOOD)
    outputs = run_to_completion(engine)
    assert outputs["long"].outputs[0].finish_reason == "error"
    assert "78 tokens; it must be shorter than max_model_len=64" in outputs["long"].error
    assert outputs["good"].error is None and len(outputs["good-2"].outputs[0].token_ids) == 5


def test_prompt_larger_than_the_kv_cache_fails_alone(tiny_model_dir):
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=2, block_size=16)
    engine.add_request("huge", list(range(2, 40)), GOOD)
    engine.add_request("small", [4, 5], GOOD)
    outputs = run_to_completion(engine)
    assert "KV cache holds only 32 tokens" in outputs["huge"].error
    assert len(outputs["small"].outputs[0].token_ids) == 5


def test_duplicate_request_id(engine):
    engine.add_request("same", [5], GOOD)
    with pytest.raises(ValueError, match="'same' is already in use"):
        engine.add_request("same", [6], GOOD)
    run_to_completion(engine)


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0), ("seed", "abc"),
    ("stop", [""]), ("stop", 5), ("stop_token_ids", "x"), ("include_stop_str_in_output", "maybe"),
    ("ignore_eos", "maybe"), ("max_tokens", 0), ("min_tokens", -1), ("logprobs", 21), ("logprobs", -1),
    ("prompt_logprobs", 21), ("skip_special_tokens", "maybe"), ("detokenize", "maybe"), ("output_kind", "all"),
    ("top_kk", 3),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("values,match", [
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens=5 is more than max_tokens=2"),
    ({"stop": ["x"], "detokenize": False}, "stop strings need detokenize=True"),
])
def test_inconsistent_sampling_params(values, match):
    with pytest.raises(ValidationError, match=match):
        SamplingParams(**values)


def test_setting_an_invalid_value_later_is_refused_too():
    params = SamplingParams()
    with pytest.raises(ValidationError, match="top_p"):
        params.top_p = 2.0


def test_wrong_params_type(engine):
    with pytest.raises(TypeError, match="params must be SamplingParams"):
        engine.add_request("x", [5], object())


def test_invalid_engine_args_name_the_field():
    with pytest.raises(ValidationError, match="block_size"):
        LLMEngine.from_engine_args(block_size=0)
    with pytest.raises(ValidationError, match="not_an_arg"):
        LLMEngine.from_engine_args(not_an_arg=1)


def test_max_model_len_beyond_the_model(tiny_model_dir):
    with pytest.raises(ValueError, match="max_model_len=4096 is longer than the model's max_position_embeddings"):
        LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), max_model_len=4096)


def test_llm_generate_refuses_a_batch_with_a_bad_prompt_and_leaves_nothing_queued(tiny_model_dir):
    llm = LLM(model=tiny_model_dir("qwen3"), num_kv_blocks=16)
    with pytest.raises(ValueError, match="prompt 1: the prompt is empty"):
        llm.generate([[5, 6], "", [7]], GOOD)
    assert_all_blocks_free(llm.engine)
    assert len(llm.generate([[5, 6]], GOOD)[0].outputs[0].token_ids) == 5


def test_registering_an_existing_architecture_needs_override():
    with pytest.raises(ValueError, match="already registered.*override=True"):
        registry.register_model("LlamaForCausalLM", model="x:Y", workflow="x:Z")
    with pytest.raises(ValueError, match="unknown task 'dance'"):
        registry.register_model("NewForCausalLM", model="x:Y", workflow="x:Z", task="dance")


def test_a_task_the_architecture_cannot_do(tiny_model_dir):
    with pytest.raises(ValueError, match="'Qwen3ForCausalLM' cannot classify; it can: generate, embed, score"):
        LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), task="classify")


class FaultyWorker(__import__("wde.workflows.decoding.worker", fromlist=["DecodingWorker"]).DecodingWorker):
    """Fails any step whose batch holds token 13."""

    def launch(self, model_input):  # every step comes through here, synchronous (execute_model) or not
        if (model_input.input_ids == 13).any():
            raise RuntimeError("token 13 breaks this model")
        return super().launch(model_input)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(tiny_model_dir):
    from tests.conftest import run_to_completion
    from wde.tasks.chat.workflow import ChatWorkflow

    class Faulty(ChatWorkflow):
        Worker = f"{__name__}:FaultyWorker"
    engine = LLMEngine.from_workflow(Faulty, model=tiny_model_dir("qwen3"), num_kv_blocks=16)
    engine.add_request("bad", [5, 13, 6], GOOD)
    outputs = run_to_completion(engine)
    assert outputs["bad"].error == "the model step failed: RuntimeError: token 13 breaks this model"
    assert outputs["bad"].internal_error
    engine.add_request("good", [5, 6], GOOD)
    assert len(run_to_completion(engine)["good"].outputs[0].token_ids) == 5


def test_longrope_past_its_original_context_is_refused_and_within_it_taken(tiny_model_dir):
    folder = tiny_model_dir("phi3", max_position_embeddings=2048)  # LongRoPE's original context: 1,024
    with pytest.raises(ValueError, match=r"LongRoPE past the original context \(1024 tokens\)"):
        LLMEngine.from_engine_args(model=folder, num_kv_blocks=8)
    LLMEngine.from_engine_args(model=folder, num_kv_blocks=8, max_model_len=1024)
