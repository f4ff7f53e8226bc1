"""CUDA graphs of decode steps: one captured forward pass (and LM head) per batch size of a ladder.

A decode step launches a dozen kernels per layer, each doing little; replaying a captured graph launches them
all at once. On one GPU the graph also takes each row's greedy token (the argmax of its logits), so an
all-greedy step launches nothing else before its tokens are copied out; under tensor parallelism that vote is a
collective, which runs outside the graph. Inputs go through static buffers: a batch is padded up to the next
captured size, with padding rows that write no KV (slot -1) and attend to nothing (length 0). Batches larger
than the largest size, and steps with prefill, run eagerly.
"""
import logging
import time
from typing import Callable

import torch

from wde.core.attention.metadata import PagedAttentionMetadata
from wde.core.forward_context import set_forward_context

logger = logging.getLogger(__name__)


def batch_size_ladder(max_batch: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, max_batch + 8, 8))
    return [size for size in sizes if size < max_batch] + [max_batch]


class DecodeCudaGraphs:
    def __init__(self, model: torch.nn.Module, max_batch: int, max_model_len: int, block_size: int,
                 device: torch.device, greedy_tokens: Callable[[torch.Tensor], torch.Tensor] | None):
        self.model = model
        self.greedy_tokens = greedy_tokens  # [rows, vocabulary slice] logits -> [rows] token ids, if captured
        self.sizes = batch_size_ladder(max_batch)
        self.max_model_len = max_model_len
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor | None] = {}
        self._capture_all()

    def _metadata(self, size: int) -> PagedAttentionMetadata:
        # the host-side lengths only steer the backend's launch choices; the kernels read the device tensors
        return PagedAttentionMetadata(self.slot_mapping[:size], self.query_start_loc[:size + 1],
                                      self.seq_lens[:size], self.block_tables[:size], [1] * size,
                                      [self.max_model_len] * size)

    def _forward(self, size: int) -> torch.Tensor:
        with set_forward_context(self._metadata(size)):
            hidden = self.model(self.input_ids[:size], self.positions[:size])
        return self.model.compute_logits(hidden, gather=False)  # the sampling side gathers, or not

    @torch.inference_mode()
    def _capture_all(self) -> None:
        start = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):  # the largest first, so the smaller ones fit in its memory pool
            self._forward(size)  # warm-up: Triton compiles, cuBLAS picks its kernels
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (a finished tensor-parallel group's NCCL teardown, for
            # one) must not invalidate this capture
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.logits[size] = self._forward(size)
                self.tokens[size] = self.greedy_tokens(self.logits[size]) if self.greedy_tokens else None
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs of decode steps (batch sizes %d..%d) in %.1f s", len(self.sizes),
                    self.sizes[0], self.sizes[-1], time.perf_counter() - start)

    def can_run(self, num_seqs: int, max_query_len: int) -> bool:
        return max_query_len == 1 and num_seqs <= self.sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: PagedAttentionMetadata
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's vocabulary slice of a decode step's logits (every row samples), and each row's greedy
        token when the graph takes it."""
        count = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= count)
        self.input_ids[:count].copy_(input_ids, non_blocking=True)
        self.positions[:count].copy_(positions, non_blocking=True)
        self.slot_mapping[:count].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:count].copy_(meta.seq_lens, non_blocking=True)
        self.block_tables[:count, :meta.block_tables.shape[1]].copy_(meta.block_tables, non_blocking=True)
        if size > count:
            self.slot_mapping[count:size].fill_(-1)
            self.seq_lens[count:size].fill_(0)
        self.graphs[size].replay()
        tokens = self.tokens[size]
        return self.logits[size][:count], None if tokens is None else tokens[:count]
