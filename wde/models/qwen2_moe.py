"""Qwen2-MoE: Qwen2 whose MLPs are mixtures of experts plus a shared expert every token takes, scaled by a
sigmoid gate (the dense layers chosen as in Qwen3-MoE)."""
from torch import nn
from transformers import PretrainedConfig

from wde.models.qwen2 import Qwen2ForCausalLM
from wde.models.qwen3_moe import qwen_moe_feed_forward


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    @staticmethod
    def feed_forward(config: PretrainedConfig, layer_index: int) -> nn.Module:
        return qwen_moe_feed_forward(config, layer_index, config.shared_expert_intermediate_size)
