import torch
from torch import nn

from wde.core.layers.activation import GATED_ACTIVATIONS
from wde.core.layers.linear import MergedColumnParallelLinear, RowParallelLinear


def gated_activation(hidden_act: str) -> nn.Module:
    if hidden_act not in GATED_ACTIVATIONS:
        raise ValueError(f"hidden_act {hidden_act!r} is not supported (only {', '.join(GATED_ACTIVATIONS)})")
    return GATED_ACTIVATIONS[hidden_act]()


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): the feed-forward of Llama-family models (silu; the experts of MoE models) and
    Gemma (gelu), gate/up split by output over the tensor-parallel ranks, down by input."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", bias: bool = False):
        super().__init__()
        self.act = gated_activation(hidden_act)
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, {"gate": intermediate_size,
                                                                     "up": intermediate_size}, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))
