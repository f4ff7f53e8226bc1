"""Write a tiny safetensors checkpoint as a .gguf file the way llama.cpp's converter lays it out (float32)."""
import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from wde.core.loader.gguf_weights import _EXPERT_STACKS, _GLOBAL_NAMES, _LAYER_NAMES, LAYER_NAMES_BY_TYPE

# llama.cpp's architecture names: Mixtral's files are its "llama" with experts
ARCHITECTURES = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama", "gemma3_text": "gemma3"}
EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
MIXTRAL_PARTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp stores Llama q/k rows with each head's two rotary halves interleaved."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_name(hf_name: str, model_type: str) -> str:
    to_gguf = {hf: g for g, hf in {**LAYER_NAMES_BY_TYPE.get(model_type, _LAYER_NAMES), **_GLOBAL_NAMES}.items()}
    parts = hf_name.replace(".block_sparse_moe.", ".mlp.").split(".")
    if parts[:2] == ["model", "layers"]:
        return f"blk.{parts[2]}.{to_gguf['.'.join(parts[3:-1])]}.{parts[-1]}"
    return f"{to_gguf['.'.join(parts[:-1])]}.{parts[-1]}"


def add_experts(writer: gguf.GGUFWriter, config: dict) -> None:
    """The experts' counts and sizes, under the keys llama.cpp's converter writes."""
    count = config.get("num_experts") or config.get("num_local_experts")
    if not count:
        return
    writer.add_expert_count(count)
    writer.add_expert_used_count(config["num_experts_per_tok"])
    if "moe_intermediate_size" in config:
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if config.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])


def export_gguf(folder: Path, out: Path) -> Path:
    config = json.loads((folder / "config.json").read_text())
    arch = ARCHITECTURES.get(config["model_type"], config["model_type"])
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(out), arch)
    add_experts(writer, config)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope_parameters = config.get("rope_parameters", {})
    if "full_attention" in rope_parameters:  # Gemma 3: the file holds the global layers' RoPE
        rope_parameters = rope_parameters["full_attention"]
        if rope_parameters.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope_parameters["factor"])
    writer.add_rope_freq_base(config["rope_theta"] if "rope_theta" in config else rope_parameters["rope_theta"])
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):  # Gemma 2
        if config.get(key):
            getattr(writer, f"add_{key}")(config[key])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    if config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    rope = AutoConfig.from_pretrained(folder).rope_parameters
    if rope.get("rope_type") == "longrope":  # llama.cpp keeps Phi-3's factors as two tensors
        writer.add_rope_scaling_orig_ctx_len(config["original_max_position_embeddings"])
        for kind in ("long", "short"):
            writer.add_tensor(f"rope_factors_{kind}.weight", np.array(rope[f"{kind}_factor"], dtype=np.float32))
    if rope.get("rope_type") == "llama3":  # llama.cpp keeps the scaled frequencies as divisors of the plain ones
        plain = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(folder), "cpu")
        writer.add_tensor("rope_freqs.weight", (plain / scaled).numpy().astype(np.float32))
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, tensor in load_file(folder / "model.safetensors").items():
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = llama_cpp_permute(tensor, heads if "q_proj" in name else kv_heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):  # llama.cpp adds Gemma's 1 to its norms
            tensor = tensor + 1
        expert = EXPERT.fullmatch(name)
        if expert:  # stacked per layer and part below, as llama.cpp does
            layer, index, part = expert.groups()
            experts.setdefault((layer, MIXTRAL_PARTS.get(part, part)), {})[int(index)] = tensor
            continue
        writer.add_tensor(gguf_name(name, config["model_type"]), np.ascontiguousarray(tensor, dtype=np.float32))
    stack_names = {part: name for name, part in _EXPERT_STACKS.items()}
    for (layer, part), by_index in experts.items():
        stacked = np.stack([by_index[i] for i in range(len(by_index))])
        writer.add_tensor(f"blk.{layer}.{stack_names[part]}.weight", np.ascontiguousarray(stacked, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
