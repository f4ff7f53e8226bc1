"""Scheduler output -> one flat, unpadded batch of the new tokens of every input, with what pooling needs."""
from array import array
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from wde.core import interfaces
from wde.core.attention.metadata import (EncoderAttentionMetadata, PagedAttentionMetadata, build_attn_metadata,
                                         slots_of)
from wde.core.kv_cache.host_tier import BlockCopies
from wde.core.pooling_params import PoolingParams
from wde.workflows.prefill_only.scheduler import PrefillOnlySchedulerOutput


@dataclass
class PoolingMetadata:
    """Input i is rows first_rows[i] : first_rows[i] + num_rows[i] of the batch (its tokens not from the cache)."""

    first_rows: torch.Tensor  # [num_inputs] int64
    num_rows: torch.Tensor  # [num_inputs] int64
    params: list[PoolingParams]


@dataclass
class PrefillOnlyModelInput:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    token_type_ids: torch.Tensor | None
    attn_metadata: EncoderAttentionMetadata | PagedAttentionMetadata
    pooling: PoolingMetadata
    block_copies: BlockCopies = field(default_factory=BlockCopies)  # between the KV cache's tiers, run first

    def for_workers(self) -> "PrefillOnlyModelInput":
        """Everything but the pooling parameters: rank 0 pools."""
        return replace(self, pooling=replace(self.pooling, params=[]))


class PrefillOnlyModelPreProcessor(interfaces.ModelPreProcessor[PrefillOnlySchedulerOutput, PrefillOnlyModelInput]):
    def __init__(self, config):
        super().__init__(config)
        self.block_size = config.args.block_size

    def __call__(self, scheduler_output: PrefillOnlySchedulerOutput) -> PrefillOnlyModelInput:
        inputs = scheduler_output.scheduled
        token_ids = array("q")  # concatenating machine-int buffers: a 64k-token step costs ~0.1 ms, not ~4
        for item in inputs:
            token_ids.extend(item.seq.token_ids[item.num_cached_tokens:] if item.num_cached_tokens
                             else item.seq.token_ids)
        num_rows = [item.seq.num_tokens - item.num_cached_tokens for item in inputs]
        positions = np.concatenate([np.arange(item.num_cached_tokens, item.seq.num_tokens) for item in inputs])
        first_rows = np.zeros(len(inputs), dtype=np.int64)
        np.cumsum(num_rows[:-1], out=first_rows[1:])
        pooling = PoolingMetadata(torch.from_numpy(first_rows), torch.tensor(num_rows, dtype=torch.int64),
                                  [item.seq.request.params for item in inputs])
        return PrefillOnlyModelInput(torch.frombuffer(token_ids, dtype=torch.int64), torch.from_numpy(positions),
                                     self._token_types(inputs), self._attn_metadata(scheduler_output, num_rows),
                                     pooling, scheduler_output.block_copies)

    @staticmethod
    def _token_types(inputs: list) -> torch.Tensor | None:
        """Segment ids when some input is a (query, document) pair for a model that uses them."""
        if not any(item.seq.token_type_ids for item in inputs):
            return None
        return torch.tensor([t for item in inputs for t in (item.seq.token_type_ids or [0] * item.seq.num_tokens)],
                            dtype=torch.int64)

    def _attn_metadata(self, scheduler_output: PrefillOnlySchedulerOutput, num_rows: list[int]):
        seqs = [item.seq for item in scheduler_output.scheduled]
        if not seqs[0].block_table:  # an encoder: each input attends to itself, nothing cached
            cu_seqlens = np.zeros(len(seqs) + 1, dtype=np.int32)
            np.cumsum(num_rows, out=cu_seqlens[1:])
            return EncoderAttentionMetadata(torch.from_numpy(cu_seqlens), num_rows)
        slots = [slot for seq, rows in zip(seqs, num_rows)
                 for slot in slots_of(seq.block_table, seq.num_tokens - rows, seq.num_tokens, self.block_size)]
        return build_attn_metadata(slots, num_rows, [seq.num_tokens for seq in seqs],
                                   [seq.block_table for seq in seqs])
