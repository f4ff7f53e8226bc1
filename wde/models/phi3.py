"""Phi-3: Llama's layers, saved with q/k/v as one tensor and gate/up as another; its LongRoPE scaling (short
factors within the original context, long ones past it) taken where the short factors serve every sequence."""
from typing import Iterable, Iterator

import torch

from wde.core.config import ModelConfig
from wde.core.layers.linear import materialize
from wde.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    one_window_for_all_layers = True

    def __init__(self, model_config: ModelConfig):
        config = model_config.hf_config
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported")
        original = getattr(config, "original_max_position_embeddings", None)
        if rope.get("rope_type") == "longrope" and original and model_config.max_model_len > original:
            # transformers switches every position to the long factors once a sequence passes the original
            # context: one cache of cos/sin cannot follow that
            raise ValueError(f"LongRoPE past the original context ({original} tokens) is not supported; a "
                             f"max_model_len <= {original} keeps to its short factors")
        self.q_size = config.num_attention_heads * model_config.head_dim
        self.kv_size = config.num_key_value_heads * model_config.head_dim
        super().__init__(model_config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._split(weights))

    def _split(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The fused tensors as the parts the merged layers load: q / k / v rows, then gate / up halves."""
        for name, tensor in weights:
            if name.endswith(".qkv_proj.weight"):
                q, k, v = materialize(tensor).split([self.q_size, self.kv_size, self.kv_size])
                yield from ((name.replace("qkv_proj", part), t) for part, t in
                            (("q_proj", q), ("k_proj", k), ("v_proj", v)))
            elif name.endswith(".gate_up_proj.weight"):
                gate, up = materialize(tensor).chunk(2)
                yield name.replace("gate_up_proj", "gate_proj"), gate
                yield name.replace("gate_up_proj", "up_proj"), up
            else:
                yield name, tensor
