"""RMSNorm, with the residual add folded in (one pass instead of two on the GPU)."""
import torch
from torch import nn

from wde.core.layers.linear import default_weight_loader, materialize

if torch.cuda.is_available():  # Triton comes with CUDA builds of torch
    from wde.core.kernels.rms_norm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 and cast back before the weight, as transformers does, so results match bit for bit
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with a residual: (norm(x + residual), x + residual)."""
        if x.is_cuda:
            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return rms_norm(x, self.weight, self.eps, residual), residual  # residual updated in place
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm scales by (1 + weight): checkpoints hold the offset from 1, loaded here as 1 + it, so
    every path (and the GPU kernel) multiplies by the weight as it is."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__(hidden_size, eps)
        self.weight.weight_loader = lambda param, loaded: default_weight_loader(param, materialize(loaded) + 1)
