import torch
from torch import nn

from wde.core.layers.activation import SiluAndMul
from wde.core.layers.linear import MergedColumnParallelLinear, RowParallelLinear


def check_silu(hidden_act: str) -> None:
    if hidden_act != "silu":
        raise ValueError(f"hidden_act {hidden_act!r} is not supported (only silu)")


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the feed-forward of Llama-family models (and the experts of MoE models),
    gate/up split by output over the tensor-parallel ranks, down by input."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", bias: bool = False):
        super().__init__()
        check_silu(hidden_act)
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, {"gate": intermediate_size,
                                                                     "up": intermediate_size}, bias=bias)
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))
