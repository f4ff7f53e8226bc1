"""Checkpoint tensors from a .gguf file, dequantized to float32 and renamed to Hugging Face's names."""
import re
from typing import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from transformers import PretrainedConfig

from wde.core.loader import gguf_cache

# llama.cpp's tensor names for the Llama family and its mixtures of experts -> Hugging Face's (after "blk.N.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # the router
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",  # Qwen2-MoE's shared expert, and its gate
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Phi-3 keeps q/k/v in one tensor and gate/up in another, as Hugging Face's checkpoints do
_PHI3_LAYER_NAMES = {**_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# Gemma norms the attention and the MLP both before and after
_GEMMA_LAYER_NAMES = {**_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm",
                      "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
LAYER_NAMES_BY_TYPE = {"phi3": _PHI3_LAYER_NAMES, "gemma2": _GEMMA_LAYER_NAMES, "gemma3_text": _GEMMA_LAYER_NAMES}
# llama.cpp stores Gemma's RMSNorm weights with their 1 added (it scales by the weight): Hugging Face's hold the
# offset from 1, which the model's loader adds (GemmaRMSNorm)
NORMS_WITH_ONE_ADDED = frozenset({"gemma2", "gemma3_text"})
# tensors that hold RoPE scaling, read into the config (gguf_cache.write_config)
ROPE_TENSORS = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})
# llama.cpp stacks the experts of a layer in one tensor, [experts, rows, columns]: Hugging Face's tensors per expert
_EXPERT_STACKS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str, model_type: str) -> str:
    """Hugging Face's name of a tensor ("model.layers.N.mlp.experts.{}.gate_proj.weight" for a stack of experts:
    expert e's is its .format(e))."""
    match = _LAYER_TENSOR.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        names = LAYER_NAMES_BY_TYPE.get(model_type, _LAYER_NAMES)
        if part in names:
            return f"model.layers.{layer}.{names[part]}.{kind}"
        if part in _EXPERT_STACKS:
            return f"model.layers.{layer}.mlp.experts.{{}}.{_EXPERT_STACKS[part]}.{kind}"
    else:
        base, _, kind = gguf_name.rpartition(".")
        if base in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[base]}.{kind}"
    raise ValueError(f"unknown tensor {gguf_name!r} in the .gguf file")


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Llama q/k rows (it interleaves the two rotary halves of each head)."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def iterate_gguf(path: str, hf_config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The file's tensors, found through the table the config's load kept (gguf_cache), not by parsing the
    file's metadata again."""
    try:
        table, file = gguf_cache.tensors(path), np.memmap(path, np.uint8, "r")
    except Exception as e:  # gguf raises ValueError, struct.error, ... for a damaged file
        raise ValueError(f"could not read weights from {path}: {e}") from e
    permuted = {"q_proj": hf_config.num_attention_heads, "k_proj": hf_config.num_key_value_heads}
    # llama.cpp permutes q/k only for its "llama" architecture, which Mixtral's files are
    is_llama = hf_config.model_type in ("llama", "mixtral")
    for tensor in table:
        if tensor.name in ROPE_TENSORS:  # RoPE scaling, read into the config (see gguf_cache)
            continue
        name = hf_name(tensor.name, hf_config.model_type)
        weight = dequantize(gguf_cache.tensor_data(file, tensor), GGMLQuantizationType(tensor.ggml_type))
        weight = weight.reshape(tensor.shape)
        proj = name.split(".")[-2]
        if is_llama and proj in permuted:
            weight = unpermute_rows(weight, permuted[proj])
        # unquantized tensors come back as read-only views of the memory-mapped file: copy those only
        weight = torch.from_numpy(np.require(weight, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
        if name.endswith("shared_expert_gate.weight") and weight.dim() == 1:  # quantized files keep it 1-D
            weight = weight[None]
        if hf_config.model_type in NORMS_WITH_ONE_ADDED and name.endswith("norm.weight"):
            weight = weight - 1
        if "{}" in name:  # a stack of experts: one tensor each, as the model's loader takes them
            yield from ((name.format(expert), expert_weight) for expert, expert_weight in enumerate(weight))
        else:
            yield name, weight
