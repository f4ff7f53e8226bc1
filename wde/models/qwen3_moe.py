"""Qwen3-MoE: Qwen3 whose MLPs are mixtures of experts (softmax routing, top-k renormalized when norm_topk_prob),
but for the layers mlp_only_layers names and those decoder_sparse_step skips."""
from torch import nn
from transformers import PretrainedConfig

from wde.core.layers.mlp import GatedMLP
from wde.core.layers.moe import Routing, SparseMoeBlock
from wde.models.qwen3 import Qwen3ForCausalLM


def qwen_moe_feed_forward(config: PretrainedConfig, layer_index: int, shared_intermediate_size: int = 0
                          ) -> nn.Module:
    """The experts (and shared expert) of Qwen's MoE models, or a dense MLP in the layers they leave dense."""
    sparse = (layer_index not in config.mlp_only_layers and config.num_experts > 0
              and (layer_index + 1) % config.decoder_sparse_step == 0)
    if not sparse:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
    routing = Routing(top_k=config.num_experts_per_tok, renormalize=config.norm_topk_prob)
    return SparseMoeBlock(config.hidden_size, config.num_experts, config.moe_intermediate_size, routing,
                          config.hidden_act, shared_intermediate_size)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    @staticmethod
    def feed_forward(config: PretrainedConfig, layer_index: int) -> nn.Module:
        return qwen_moe_feed_forward(config, layer_index)
