"""Checkpoint tensors from a .gguf file, dequantized to float32 and renamed to Hugging Face's names."""
import re
from typing import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from transformers import PretrainedConfig

from wde.core.loader import gguf_cache

# llama.cpp's tensor names for the Llama family -> Hugging Face's (the part after "blk.N.")
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
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str:
    match = _LAYER_TENSOR.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
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
    is_llama = hf_config.model_type == "llama"  # llama.cpp permutes q/k only for Llama
    for tensor in table:
        if tensor.name == "rope_freqs.weight":  # RoPE scaling, read into the config (see gguf_cache)
            continue
        name = hf_name(tensor.name)
        weight = dequantize(gguf_cache.tensor_data(file, tensor), GGMLQuantizationType(tensor.ggml_type))
        weight = weight.reshape(tensor.shape)
        proj = name.split(".")[-2]
        if is_llama and proj in permuted:
            weight = unpermute_rows(weight, permuted[proj])
        # unquantized tensors come back as read-only views of the memory-mapped file: copy those only
        yield name, torch.from_numpy(np.require(weight, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
