"""Token embeddings and the LM head, split by vocabulary over the tensor-parallel ranks."""
import torch
import torch.nn.functional as F
from torch import nn

from wde.core.layers.linear import default_weight_loader, linear, narrow
from wde.core.parallel.distributed import all_gather, all_reduce, get_tp_rank, get_tp_size


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary (padded to divide evenly); a token outside a rank's
    slice embeds to zeros there, and the ranks' rows are summed."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        world_size = get_tp_size()
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // world_size)
        self.first = get_tp_rank() * self.rows
        if self.first >= vocab_size:
            raise ValueError(f"a vocabulary of {vocab_size} tokens cannot be split over {world_size} ranks")
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)
        self.weight.weight_loader = self._load_weight

    def _load_weight(self, param: nn.Parameter, loaded) -> None:
        present = max(0, min(self.rows, self.vocab_size - self.first))  # the last slice may be partly padding
        default_weight_loader(param.data[:present], narrow(loaded, 0, self.first, present, self.vocab_size))
        param.data[present:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if get_tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.first
        outside = (local < 0) | (local >= self.rows)
        embedded = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(embedded.masked_fill(outside[:, None], 0.0))

    def logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """As an LM head (its own, or tied to the embeddings): the logits of the whole vocabulary, gathered from
        all ranks; or, with gather=False, this rank's slice of them (padding columns included)."""
        shard = linear(hidden, self.weight)
        return gather_vocab(shard, self.vocab_size) if gather else shard


class ParallelLMHead(VocabParallelEmbedding):
    """An untied LM head: the same split and the same logits as the embeddings."""


def gather_vocab(shard: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The whole vocabulary's logits from every rank's slice, padding columns dropped."""
    return all_gather(shard, dim=-1)[..., :vocab_size]


def greedy_tokens(shard: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The argmax over the whole vocabulary, on every rank, from each rank's slice of the logits: only each
    slice's best (logit, token) crosses between the ranks, not [rows, vocab] logits, and no rank waits for
    another to sample. Ties go to the lowest token id, as with argmax over the gathered logits."""
    first = get_tp_rank() * shard.shape[-1]
    values, tokens = shard[:, :vocab_size - first].max(dim=-1)
    if get_tp_size() == 1:
        return tokens
    # float32 holds bf16 / fp16 / fp32 logits and token ids below 2**24 exactly
    best = all_gather(torch.stack([values.float(), (tokens + first).float()])[None], dim=0)  # [ranks, 2, rows]
    winner = best[:, 0].argmax(dim=0)  # the first rank that holds the maximum, so the lowest token id
    return best[:, 1].gather(0, winner[None])[0].long()
