"""Token embeddings and the LM head, split by vocabulary over the tensor-parallel ranks."""
import torch
import torch.nn.functional as F
from torch import nn

from wde.core.distributed import all_gather, all_reduce, get_tp_rank, get_tp_size
from wde.core.layers.linear import default_weight_loader, narrow


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary (padded to divide evenly); a token outside a rank's
    slice embeds to zeros there, and the ranks' rows are summed."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        world_size = get_tp_size()
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // world_size)
        self.first = get_tp_rank() * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)
        self.weight.weight_loader = self._load_weight

    def _load_weight(self, param: nn.Parameter, loaded) -> None:
        present = max(0, min(self.rows, self.vocab_size - self.first))  # the last slice may be partly padding
        default_weight_loader(param.data[:present], narrow(loaded, 0, self.first, present))
        param.data[present:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if get_tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.first
        outside = (local < 0) | (local >= self.rows)
        embedded = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(embedded.masked_fill(outside[:, None], 0.0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """As an LM head (its own, or tied to the embeddings): this rank's vocabulary slice of the logits,
        gathered from all ranks, padding columns dropped."""
        return all_gather(hidden @ self.weight.T, dim=-1)[..., :self.vocab_size]


class ParallelLMHead(VocabParallelEmbedding):
    """An untied LM head: the same split and the same logits as the embeddings."""
