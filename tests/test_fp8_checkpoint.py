"""Checkpoints published with FP8 weights load as the weights they stand for: written here in the published
layouts (block scales as Qwen3-FP8 ships them; compressed-tensors' per-channel scales), they give the tokens and
logprobs of the same model saved with those weights dequantized."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_to_completion
from tests.test_parity_random import random_prompts
from wde import LLMEngine, SamplingParams

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
BLOCK = (32, 16)  # smaller than the tiny shapes' matrices: several blocks, some of them partial
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def block_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale per BLOCK) as the FP8 converters write them: amax / 448 per block."""
    rows, columns = weight.shape
    padded = torch.zeros(-(-rows // BLOCK[0]) * BLOCK[0], -(-columns // BLOCK[1]) * BLOCK[1])
    padded[:rows, :columns] = weight
    blocks = padded.view(padded.shape[0] // BLOCK[0], BLOCK[0], padded.shape[1] // BLOCK[1], BLOCK[1])
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
    quantized = (blocks / scale[:, None, :, None]).view(padded.shape)[:rows, :columns]
    return quantized.to(torch.float8_e4m3fn), scale


def channel_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight.abs().amax(dim=1, keepdim=True) / FP8_MAX
    return (weight / scale).to(torch.float8_e4m3fn), scale


def write_fp8_pair(source, fp8_folder, reference_folder, method: str, shards: bool = False) -> None:
    """The source model as an FP8 checkpoint, and as the float32 weights that checkpoint stands for."""
    for folder in (fp8_folder, reference_folder):
        shutil.copytree(source, folder)
        (folder / "model.safetensors").unlink()
    tensors, fp8, reference = load_file(source / "model.safetensors"), {}, {}
    for name, weight in tensors.items():
        if name.endswith(".weight") and name.split(".")[-2] in QUANTIZED:
            base = name[:-len(".weight")]
            if method == "fp8":
                quantized, scale = block_quantize(weight)
                fp8[name], fp8[f"{base}.weight_scale_inv"] = quantized, scale
                expanded = scale.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)
                reference[name] = quantized.float() * expanded[:weight.shape[0], :weight.shape[1]]
            else:
                quantized, scale = channel_quantize(weight)
                fp8[name], fp8[f"{base}.weight_scale"] = quantized, scale
                reference[name] = quantized.float() * scale
        else:
            fp8[name] = reference[name] = weight
    save_file(reference, reference_folder / "model.safetensors")
    if shards:  # the scales in a shard of their own, after the weights that need them
        scales = {n: t for n, t in fp8.items() if "_scale" in n}
        save_file({n: t for n, t in fp8.items() if n not in scales}, fp8_folder / "model-1.safetensors")
        save_file(scales, fp8_folder / "model-2.safetensors")
        weight_map = {n: "model-2.safetensors" if n in scales else "model-1.safetensors" for n in fp8}
        (fp8_folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(fp8, fp8_folder / "model.safetensors")
    config = json.loads((fp8_folder / "config.json").read_text())
    config["quantization_config"] = ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(BLOCK)} if method == "fp8" else
                                     {"quant_method": "compressed-tensors", "format": "float-quantized",
                                      "ignore": ["lm_head"]})
    (fp8_folder / "config.json").write_text(json.dumps(config))


def generate(folder) -> list:
    engine = LLMEngine.from_engine_args(model=str(folder), num_kv_blocks=64, dtype="float32")
    for i, prompt in enumerate(random_prompts([7, 30, 50], seed=9)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0))
    outputs = run_to_completion(engine)
    return [outputs[str(i)].outputs[0] for i in range(3)]


@pytest.mark.parametrize("shape", ["qwen3", "llama"])
@pytest.mark.parametrize("method,shards", [("fp8", False), ("fp8", True), ("compressed-tensors", False)],
                         ids=["block scales", "block scales in another shard", "per-channel scales"])
def test_an_fp8_checkpoint_gives_the_dequantized_model(tiny_model_dir, tmp_path, shape, method, shards):
    from pathlib import Path
    fp8_folder, reference_folder = tmp_path / "fp8", tmp_path / "reference"
    write_fp8_pair(Path(tiny_model_dir(shape)), fp8_folder, reference_folder, method, shards)
    ours, reference = generate(fp8_folder), generate(reference_folder)
    assert [c.token_ids for c in ours] == [c.token_ids for c in reference]
    for a, b in zip(ours, reference):
        for step_a, step_b, token in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(step_a[token].logprob - step_b[token].logprob) < 1e-4


def test_a_quantization_wde_cannot_read_is_named(tiny_model_dir, tmp_path):
    folder = tmp_path / "awq"
    shutil.copytree(tiny_model_dir("qwen3"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantization_config 'awq' .* is not supported"):
        LLMEngine.from_engine_args(model=str(folder), num_kv_blocks=8)


def test_an_fp8_weight_without_its_scales_is_named(tiny_model_dir, tmp_path):
    from pathlib import Path
    fp8_folder, reference_folder = tmp_path / "fp8", tmp_path / "reference"
    write_fp8_pair(Path(tiny_model_dir("qwen3")), fp8_folder, reference_folder, "fp8")
    tensors = load_file(fp8_folder / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    save_file(tensors, fp8_folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"without their pair: model.layers.0.self_attn.q_proj.weight \(no scales\)"):
        LLMEngine.from_engine_args(model=str(fp8_folder), num_kv_blocks=8)


def damage_config(folder, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


# found by the helper's attack: these loaded into NaN outputs, or failed with bare errors
@pytest.mark.parametrize("change,message", [
    (lambda c: c["quantization_config"].update(weight_block_size=[0, 16]), "two positive sizes"),
    (lambda c: c["quantization_config"].update(weight_block_size=[-32, -16]), "two positive sizes"),
    (lambda c: c.update(quantization_config="fp8"), "could not read the model config from .*config.json"),
    (lambda c: c["quantization_config"].pop("quant_method"), "quantization_config has no quant_method")])
def test_a_damaged_fp8_config_is_refused_by_name(tiny_model_dir, tmp_path, change, message):
    from pathlib import Path
    fp8_folder, reference_folder = tmp_path / "fp8", tmp_path / "reference"
    write_fp8_pair(Path(tiny_model_dir("qwen3")), fp8_folder, reference_folder, "fp8")
    damage_config(fp8_folder, change)
    with pytest.raises(ValueError, match=message):
        LLMEngine.from_engine_args(model=str(fp8_folder), num_kv_blocks=8)


def test_a_non_finite_scale_is_named(tiny_model_dir, tmp_path):
    from pathlib import Path
    fp8_folder, reference_folder = tmp_path / "fp8", tmp_path / "reference"
    write_fp8_pair(Path(tiny_model_dir("qwen3")), fp8_folder, reference_folder, "fp8")
    tensors = load_file(fp8_folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight_scale_inv"][0, 0] = float("nan")
    save_file(tensors, fp8_folder / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight: an FP8 weight's scales are not all"):
        LLMEngine.from_engine_args(model=str(fp8_folder), num_kv_blocks=8)
