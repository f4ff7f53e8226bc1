"""What an attention backend needs to know about one step over the paged KV cache."""
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch


@dataclass
class PagedAttentionMetadata:
    """One step's batch: each sequence adds `query_len` new tokens to a context of `seq_len` tokens in all.

    The new tokens of all sequences are concatenated into one flat batch (no padding); sequence i's new tokens
    are rows query_start_loc[i]:query_start_loc[i+1]. Its whole context lives in the KV-cache blocks listed in
    block_tables[i] (padded rows; entries past the sequence's last block are meaningless).

    A model whose layers fall into several KV layer groups (wde/core/kv_cache/layer_groups.py) has a slot
    mapping and block tables per group: the first group's in `slot_mapping` and `block_tables`, the others'
    stacked in `group_slot_mappings` and `group_block_tables` (None with one group); `for_group` gives a
    group's view.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: flat cache slot (block * block_size + offset) of each token
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    query_lens_host: list[int]
    seq_lens_host: list[int]
    group_slot_mappings: torch.Tensor | None = None  # [groups - 1, num_tokens] int64
    group_block_tables: torch.Tensor | None = None  # [groups - 1, num_seqs, max_blocks_per_seq] int32

    def for_group(self, group: int) -> "PagedAttentionMetadata":
        return self._group_views[group - 1] if group else self

    @cached_property
    def _group_views(self) -> list["PagedAttentionMetadata"]:
        return [replace(self, slot_mapping=slots, block_tables=tables, group_slot_mappings=None,
                        group_block_tables=None)
                for slots, tables in zip(self.group_slot_mappings, self.group_block_tables)]

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


@dataclass
class EncoderAttentionMetadata:
    """One step of an encoder: sequence i is rows cu_seqlens[i]:cu_seqlens[i+1] of the flat batch."""

    cu_seqlens: torch.Tensor  # [num_seqs + 1] int32
    seq_lens_host: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @cached_property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_host)


def padded_tables(block_tables: list[list[int]]) -> np.ndarray:
    # numpy fills the padded table row by row far faster than torch.tensor() reads nested lists
    tables = np.zeros((len(block_tables), max(map(len, block_tables))), dtype=np.int32)
    for row, table in enumerate(block_tables):
        tables[row, :len(table)] = table
    return tables


def build_attn_metadata(slots: list[int], query_lens: list[int], seq_lens: list[int],
                        block_tables: list[list[int]], group_slots: list[list[int]] | None = None,
                        group_tables: list[list[list[int]]] | None = None) -> PagedAttentionMetadata:
    """group_slots / group_tables: the slots and tables of the KV layer groups after the first, if any."""
    query_start_loc = np.zeros(len(query_lens) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=query_start_loc[1:])
    grouped = {}
    if group_tables:
        grouped = {"group_slot_mappings": torch.tensor(group_slots, dtype=torch.int64),
                   "group_block_tables": torch.from_numpy(np.stack([padded_tables(t) for t in group_tables]))}
    return PagedAttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64), query_start_loc=torch.from_numpy(query_start_loc),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=torch.from_numpy(padded_tables(block_tables)),
        query_lens_host=query_lens, seq_lens_host=seq_lens, **grouped)


def slots_of(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of positions start..end-1 of a sequence with this block table."""
    return [block_table[pos // block_size] * block_size + pos % block_size for pos in range(start, end)]


def dummy_paged_batch(num_tokens: int, num_seqs: int, block_size: int, num_kv_groups: int = 1
                      ) -> tuple[list[int], PagedAttentionMetadata, list[int], int]:
    """A profiling batch: num_tokens new tokens over num_seqs fresh sequences that all use the same scratch
    blocks, in every KV layer group. Returns (positions, metadata, last row of each sequence, blocks the scratch
    cache needs)."""
    query_lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
    num_blocks = -(-max(query_lens) // block_size)
    positions = [pos for length in query_lens for pos in range(length)]
    tables = [list(range(num_blocks))] * num_seqs
    metadata = build_attn_metadata(positions, query_lens, query_lens, tables, [positions] * (num_kv_groups - 1),
                                   [tables] * (num_kv_groups - 1))
    last_rows = (np.cumsum(query_lens) - 1).tolist()
    return positions, metadata, last_rows, num_blocks
