"""Linear layers whose parameters know how to load themselves from checkpoint tensors."""
import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, the parameter {tuple(param.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    """y = x W^T (+ b). Parameters start uninitialized: the loader fills every one of them."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input computed by one matmul (q/k/v, or gate/up).

    Checkpoints store the parts as separate tensors; each loads into its own rows, named by its shard id.
    """

    def __init__(self, input_size: int, output_sizes: dict[str, int], bias: bool = False):
        super().__init__(input_size, sum(output_sizes.values()), bias)
        self.output_sizes = output_sizes
        for param in self.parameters():
            param.shard_ids = tuple(output_sizes)
            param.weight_loader = self._load_shard

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        offset = 0
        for name, size in self.output_sizes.items():
            if name == shard_id:
                default_weight_loader(param.data.narrow(0, offset, size), loaded)
                return
            offset += size
        raise KeyError(f"no shard {shard_id!r} in {list(self.output_sizes)}")
