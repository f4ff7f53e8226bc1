"""Qwen2-MoE: Qwen2 whose MLPs are mixtures of experts plus a shared expert every token takes, scaled by a
sigmoid gate (the dense layers chosen as in Qwen3-MoE)."""
from typing import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from wde.core.config import ModelConfig
from wde.models.qwen2 import Qwen2ForCausalLM
from wde.models.qwen3_moe import qwen_moe_feed_forward


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    def __init__(self, model_config: ModelConfig):
        super().__init__(model_config)
        self.has_shared_expert = bool(model_config.hf_config.shared_expert_intermediate_size)

    @staticmethod
    def feed_forward(config: PretrainedConfig, layer_index: int) -> nn.Module:
        return qwen_moe_feed_forward(config, layer_index, config.shared_expert_intermediate_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Without a shared expert (shared_expert_intermediate_size 0) transformers still saves its empty
        tensors and its gate, which scales nothing: those are left out."""
        if not self.has_shared_expert:
            weights = ((name, tensor) for name, tensor in weights if ".shared_expert" not in name)
        super().load_weights(weights)
