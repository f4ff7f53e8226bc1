"""What an attention backend needs to know about one step over the paged KV cache."""
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class PagedAttentionMetadata:
    """One step's batch: each sequence adds `query_len` new tokens to a context of `seq_len` tokens in all.

    The new tokens of all sequences are concatenated into one flat batch (no padding); sequence i's new tokens
    are rows query_start_loc[i]:query_start_loc[i+1]. Its whole context lives in the KV-cache blocks listed in
    block_tables[i] (padded rows; entries past the sequence's last block are meaningless).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: flat cache slot (block * block_size + offset) of each token
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    query_lens_host: list[int]
    seq_lens_host: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @cached_property
    def max_query_len(self) -> int:
        return max(self.query_lens_host)

    @cached_property
    def min_query_len(self) -> int:
        return min(self.query_lens_host)

    @cached_property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_host)

    def to(self, device: torch.device) -> "PagedAttentionMetadata":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PagedAttentionMetadata(move(self.slot_mapping), move(self.query_start_loc), move(self.seq_lens),
                                      move(self.block_tables), self.query_lens_host, self.seq_lens_host)
