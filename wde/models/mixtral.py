"""Mixtral: Llama whose MLPs are mixtures of experts (softmax routing, top-k always renormalized), saved as
`block_sparse_moe` with experts' w1 / w3 / w2 (gate / up / down)."""
from typing import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from wde.core.layers.moe import Routing, SparseMoeBlock
from wde.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    one_window_for_all_layers = True

    @staticmethod
    def feed_forward(config: PretrainedConfig, layer_index: int) -> nn.Module:
        routing = Routing(top_k=config.num_experts_per_tok, renormalize=True)
        return SparseMoeBlock(config.hidden_size, config.num_local_experts, config.intermediate_size, routing,
                              config.hidden_act)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name.replace(".block_sparse_moe.", ".mlp."), tensor) for name, tensor in weights)
