"""Inputs that a projection forms as it reads them: the RMSNorm or the gated activation before it.

At decode batch sizes a matmul is a read of its weight, a few microseconds on a small model, and the norm or
the activation before it is one more kernel launch that costs about as long. A layer hands its projection one
of these instead of a tensor; `linear` (linear.py) has the skinny matmul form it as it reads x where that
measures faster, and otherwise forms it first with the layer's own module (every CPU run, every prefill).
"""
from dataclasses import dataclass, field

import torch
from torch import nn

from wde.core.layers.activation import SiluAndMul
from wde.core.layers.norm import RMSNorm


@dataclass
class GatedInput:
    """act(gate) * up of a merged [gate | up] projection's output."""
    merged: torch.Tensor
    act: nn.Module

    def source(self) -> torch.Tensor:
        """The tensor a kernel that forms this input reads."""
        return self.merged

    def tensor(self) -> torch.Tensor:
        return self.act(self.merged)

    def skinny_options(self) -> dict | None:
        """skinny_matmul's arguments that form this input, or None where it cannot (only silu is fused)."""
        return {"gated": True} if isinstance(self.act, SiluAndMul) else None


@dataclass
class NormedInput:
    """norm(hidden + residual), or norm(hidden) where there is no residual yet (the first layer). `summed` is
    hidden + residual, the next residual: whoever forms the input writes it (the skinny matmul or the norm)."""
    hidden: torch.Tensor
    residual: torch.Tensor | None
    norm: RMSNorm
    summed: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.summed = self.hidden if self.residual is None else torch.empty_like(self.hidden)

    def source(self) -> torch.Tensor:
        return self.hidden

    def tensor(self) -> torch.Tensor:
        return self.norm.into(self.hidden, self.residual, self.summed)

    def skinny_options(self) -> dict | None:
        from wde.core.kernels.skinny_matmul import RowNorm  # only CUDA builds of torch come with Triton
        summed = self.summed if self.residual is not None else None
        return {"row_norm": RowNorm(self.norm.weight, self.norm.eps, self.residual, summed)}


FusedInput = GatedInput | NormedInput
