"""CUDA graphs of decoding steps: captured forward passes, replayed with the step's inputs in static buffers.

An eager step launches a dozen kernels per layer, each doing little, and on a fast GPU the host cannot launch
them as fast as the GPU runs them; replaying a captured graph launches them all at once. Two families:

- decode steps (one new token per sequence): one graph per batch size of a ladder, holding the LM head too. On
  one GPU it also takes each row's greedy token (the argmax of its logits), so an all-greedy step launches
  nothing else before its tokens are copied out; under tensor parallelism that vote is a collective, which runs
  outside the graph. A batch is padded up to the next size with rows that write no KV (slot -1) and attend to
  nothing (length 0).
- steps with prefill (any mix of prompt chunks and decode rows), where the attention backend reads the batch's
  structure from device tensors only: one graph of the model's forward pass per token count of a second
  ladder, over max_num_seqs sequence slots. The tokens are padded as above, the unused sequence slots are empty
  (no new tokens, no context), and the LM head runs eagerly on the rows that sample. Without these graphs a
  step with a prompt in it took ~17 ms of host launches for ~5 ms of GPU work on an H200 (docs/performance.md),
  and every stream running beside that prompt waited for it.
"""
import logging
import time
from typing import Any, Callable

import torch

from wde.core.attention.metadata import PagedAttentionMetadata
from wde.core.forward_context import set_forward_context

logger = logging.getLogger(__name__)


def batch_size_ladder(max_batch: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, max_batch + 8, 8))
    return [size for size in sizes if size < max_batch] + [max_batch]


def token_count_ladder(max_tokens: int) -> list[int]:
    """32, 64, ... 256, 320, ... 512, 640, ...: each size at most a quarter above the one before it, so padding
    adds at most ~25% to a step's matmuls, in about 30 graphs for 8,192 tokens."""
    sizes, size = [], 32
    while size < max_tokens:
        sizes.append(size)
        size += max(32, size // 4 // 32 * 32)
    return sizes + [max_tokens]


Capture = Callable[[Callable[[int], Any], int], Callable[[], Any]]  # (forward, size) -> replay


class CudaGraphCapture:
    """Captures each forward pass in a CUDA graph; all of them share one memory pool (the first one's)."""

    def __init__(self):
        self.pool = None
        self.warm_up_seconds = self.capture_seconds = 0.0  # where start-up's capture time goes (logged)

    def __call__(self, forward: Callable[[int], Any], size: int) -> Callable[[], Any]:
        start = time.perf_counter()
        forward(size)  # warm-up: Triton compiles, cuBLAS picks its kernels
        torch.cuda.synchronize()
        warmed_up = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a finished tensor-parallel group's NCCL teardown, for one)
        # must not invalidate this capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = forward(size)
        torch.cuda.synchronize()
        self.pool = graph.pool()
        self.warm_up_seconds += warmed_up - start
        self.capture_seconds += time.perf_counter() - warmed_up

        def replay() -> Any:
            graph.replay()
            return out
        return replay


class StepCudaGraphs:
    """The captured steps and the static buffers they read. `capture` is CudaGraphCapture() but in tests, where
    a capture that runs the forward pass again on every replay checks the padding on the CPU."""

    def __init__(self, model: torch.nn.Module, max_batch: int, max_tokens: int, max_model_len: int,
                 block_size: int, device: torch.device, greedy_tokens: Callable[[torch.Tensor], torch.Tensor] | None,
                 with_prefill: bool, capture: Capture | None = None, num_kv_groups: int = 1):
        self.model = model
        self.greedy_tokens = greedy_tokens  # [rows, vocabulary slice] logits -> [rows] token ids, if captured
        self.sizes = batch_size_ladder(max_batch)
        self.token_counts = token_count_ladder(max_tokens) if with_prefill else []
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        rows = max(max_batch, max_tokens if with_prefill else 0)
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.decode_starts = torch.arange(max_batch + 1, dtype=torch.int32, device=device)  # one row per sequence
        self.query_starts = torch.zeros(max_batch + 1, dtype=torch.int32, device=device)  # written every step
        self.block_tables = torch.zeros(max_batch, -(-max_model_len // block_size), dtype=torch.int32,
                                        device=device)
        # the KV layer groups after the first (a model that mixes windows): their slots and tables, or None
        self.group_slot_mapping = self.group_block_tables = None
        if num_kv_groups > 1:
            self.group_slot_mapping = torch.full((num_kv_groups - 1, rows), -1, dtype=torch.int64, device=device)
            self.group_block_tables = torch.zeros(num_kv_groups - 1, *self.block_tables.shape, dtype=torch.int32,
                                                  device=device)
        # size -> replay(), which runs the captured step again and returns its outputs (static tensors)
        self.decode_replays: dict[int, Callable[[], tuple[torch.Tensor, torch.Tensor | None]]] = {}
        self.prefill_replays: dict[int, Callable[[], torch.Tensor]] = {}
        capture = capture or CudaGraphCapture()
        self._capture_all(capture)
        if isinstance(capture, CudaGraphCapture):
            logger.info("capture time: %.2f s in warm-up forward passes, %.2f s capturing", capture.warm_up_seconds,
                        capture.capture_seconds)

    def _decode_metadata(self, size: int) -> PagedAttentionMetadata:
        # the host-side lengths only steer the backend's launch choices; the kernels read the device tensors
        return PagedAttentionMetadata(self.slot_mapping[:size], self.decode_starts[:size + 1],
                                      self.seq_lens[:size], self.block_tables[:size], [1] * size,
                                      [self.max_model_len] * size, *self._group_buffers(size, size))

    def _prefill_metadata(self, num_tokens: int) -> PagedAttentionMetadata:
        # a decode row and a prompt chunk among the slots: the backend launches both kernels, sized for any step
        seqs = self.max_batch
        return PagedAttentionMetadata(self.slot_mapping[:num_tokens], self.query_starts, self.seq_lens,
                                      self.block_tables, [2] + [1] * (seqs - 1), [self.max_model_len] * seqs,
                                      *self._group_buffers(num_tokens, seqs))

    def _group_buffers(self, num_tokens: int, num_seqs: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.group_slot_mapping is None:
            return None, None
        return self.group_slot_mapping[:, :num_tokens], self.group_block_tables[:, :num_seqs]

    def _decode_forward(self, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        with set_forward_context(self._decode_metadata(size)):
            hidden = self.model(self.input_ids[:size], self.positions[:size])
        logits = self.model.compute_logits(hidden, gather=False)  # the sampling side gathers, or not
        return logits, self.greedy_tokens(logits) if self.greedy_tokens else None

    def _prefill_forward(self, num_tokens: int) -> torch.Tensor:
        with set_forward_context(self._prefill_metadata(num_tokens)):
            return self.model(self.input_ids[:num_tokens], self.positions[:num_tokens])

    @torch.inference_mode()
    def _capture_all(self, capture: Capture) -> None:
        start = time.perf_counter()
        # the largest first, so the smaller ones fit in its memory pool; steps with prefill are the largest
        for count in reversed(self.token_counts):
            self.prefill_replays[count] = capture(self._prefill_forward, count)
        for size in reversed(self.sizes):
            self.decode_replays[size] = capture(self._decode_forward, size)
        logger.info("captured %d CUDA graphs of decode steps (batch sizes %d..%d) and %d of steps with prefill "
                    "(%s tokens) in %.1f s", len(self.sizes), self.sizes[0], self.sizes[-1], len(self.token_counts),
                    f"{self.token_counts[0]}..{self.token_counts[-1]}" if self.token_counts else "no",
                    time.perf_counter() - start)

    def can_run_decode(self, meta: PagedAttentionMetadata) -> bool:
        return meta.max_query_len == 1 and meta.num_seqs <= self.sizes[-1]

    def can_run_with_prefill(self, num_tokens: int, meta: PagedAttentionMetadata) -> bool:
        return bool(self.token_counts) and num_tokens <= self.token_counts[-1] and meta.num_seqs <= self.max_batch

    def run_decode(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: PagedAttentionMetadata
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's vocabulary slice of a decode step's logits (every row samples), and each row's greedy
        token when the graph takes it."""
        count = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= count)
        self._load_tokens(input_ids, positions, meta, size)
        self._load_sequences(meta, size)
        logits, tokens = self.decode_replays[size]()
        return logits[:count], None if tokens is None else tokens[:count]

    def run_with_prefill(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: PagedAttentionMetadata
                         ) -> torch.Tensor:
        """The last layer's hidden states of a step with prefill, one row per token."""
        count = input_ids.shape[0]
        size = next(s for s in self.token_counts if s >= count)
        self._load_tokens(input_ids, positions, meta, size)
        self._load_sequences(meta, self.max_batch)
        self.query_starts[:meta.num_seqs + 1].copy_(meta.query_start_loc, non_blocking=True)
        if meta.num_seqs < self.max_batch:  # the unused slots start (and end) after the last token
            self.query_starts[meta.num_seqs + 1:].fill_(count)
        return self.prefill_replays[size]()[:count]

    def _load_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: PagedAttentionMetadata,
                     size: int) -> None:
        count = input_ids.shape[0]
        self.input_ids[:count].copy_(input_ids, non_blocking=True)
        self.positions[:count].copy_(positions, non_blocking=True)
        self.slot_mapping[:count].copy_(meta.slot_mapping, non_blocking=True)
        if size > count:
            self.slot_mapping[count:size].fill_(-1)  # padding writes no KV
        if self.group_slot_mapping is not None:
            self.group_slot_mapping[:, :count].copy_(meta.group_slot_mappings, non_blocking=True)
            if size > count:
                self.group_slot_mapping[:, count:size].fill_(-1)

    def _load_sequences(self, meta: PagedAttentionMetadata, slots: int) -> None:
        count = meta.num_seqs
        self.seq_lens[:count].copy_(meta.seq_lens, non_blocking=True)
        if slots > count:
            self.seq_lens[count:slots].fill_(0)  # padding attends to nothing
        self.block_tables[:count, :meta.block_tables.shape[1]].copy_(meta.block_tables, non_blocking=True)
        if self.group_block_tables is not None:
            self.group_block_tables[:, :count, :meta.block_tables.shape[1]].copy_(meta.group_block_tables,
                                                                                 non_blocking=True)
