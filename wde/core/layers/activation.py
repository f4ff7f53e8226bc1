import torch
import torch.nn.functional as F
from torch import nn

if torch.cuda.is_available():  # Triton comes with CUDA builds of torch
    from wde.core.kernels.activation import silu_and_mul


class SiluAndMul(nn.Module):
    """[..., 2d] -> silu(first half) * second half: the gated MLP of Llama-family models."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """[..., 2d] -> gelu(first half, tanh approximation) * second half: Gemma's gated MLP (GeGLU). Plain torch
    on every device: its gelu is one kernel; a fused kernel like silu_and_mul's is for when Gemma is measured."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


GATED_ACTIVATIONS = {"silu": SiluAndMul, "gelu_pytorch_tanh": GeluTanhAndMul}
