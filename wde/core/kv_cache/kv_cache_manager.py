"""Which KV-cache blocks hold which sequence's tokens (the bookkeeping; the tensors live in the Worker).

With prefix caching on, every full block is known by a hash chained over its tokens and all tokens before it,
so two sequences that start with the same tokens can share those blocks: a sequence admitted later starts
with its cached prefix already computed.
"""
import hashlib
import logging
from array import array  # noqa: F401 (also the token_ids type of prefill-only sequences)
from typing import Protocol

from wde.core import interfaces
from wde.core.config import EngineConfig
from wde.core.kv_cache.block_allocator import BlockAllocator

logger = logging.getLogger(__name__)


class CachedSequence(Protocol):
    """What the manager needs of a sequence."""

    token_ids: "list[int] | array"  # ints, as a list or an array("q")
    block_table: list[int]
    block_hashes: list[bytes]  # of its full blocks, filled in by the manager
    num_computed_tokens: int  # tokens whose K/V are in its blocks (the scheduler writes it)
    num_freed_blocks: int  # the first entries of block_table given back (free_outside_window); the manager's


def attention_window(config: EngineConfig) -> int | None:
    """The window every attention layer of the model reads within (Mistral's `sliding_window`), or None: the
    KV before it is never read again, so its blocks can go back while the sequence runs. A model with some
    global layers (Gemma) reads everything on those."""
    from wde.core.registry import resolve_model_class
    model = config.model
    if not getattr(resolve_model_class(model.architecture, model.task), "one_window_for_all_layers", False):
        return None
    window = getattr(model.hf_config, "sliding_window", None)
    return window if window and window < model.max_model_len else None


class KVCacheManager(interfaces.KVCacheManager):
    @classmethod
    def from_engine(cls, engine) -> "KVCacheManager":
        return cls(engine.config, engine.executor.num_kv_blocks)

    def __init__(self, config: EngineConfig, num_blocks: int):
        super().__init__(config)
        self.block_size = config.args.block_size
        self.window = attention_window(config)
        self.enable_prefix_caching = config.args.enable_prefix_caching
        self.allocator = BlockAllocator(num_blocks)
        self.num_queried_tokens = 0  # tokens looked up in the prefix cache
        self.num_hit_tokens = 0  # of which found

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_cached_prefix(self, seq: CachedSequence) -> int:
        """At admission, share the cached blocks that hold the start of `seq`; return the tokens reused.

        At least one token is always left to compute: its logits give the next token.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        hashes = self._full_block_hashes(seq)
        hits = []
        for block_hash in hashes[:(len(seq.token_ids) - 1) // self.block_size]:
            block = self.allocator.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        for block in hits:
            self.allocator.incref(block)
        seq.block_table = hits
        return len(hits) * self.block_size  # the scheduler's to record: it owns num_computed_tokens

    def count_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Account one admitted sequence's lookup in the hit rate (failed admissions are retried, not counted)."""
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens

    def allocate_slots(self, seq: CachedSequence, num_new_tokens: int) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens; False (and nothing changed) if too few are free."""
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > self.allocator.num_free:
            return False
        for _ in range(needed):
            seq.block_table.append(self.allocator.allocate())
        if self.enable_prefix_caching:  # blocks this step fills are findable from now on (see below)
            hashes = self._full_block_hashes(seq)
            full_before = seq.num_computed_tokens // self.block_size
            full_after = (seq.num_computed_tokens + num_new_tokens) // self.block_size
            # a block whose last token was still being sampled (async scheduling) had no hash at the last call:
            # it is cached now (cache() ignores a block already cached)
            for index in range(max(0, full_before - 1), min(full_after, len(hashes))):
                self.allocator.cache(seq.block_table[index], hashes[index])
        return True

    def free(self, seq: CachedSequence) -> None:
        for block in reversed(seq.block_table[seq.num_freed_blocks:]):  # the tail first: least likely shared
            self.allocator.decref(block)
        seq.block_table, seq.num_freed_blocks = [], 0

    def free_outside_window(self, seq: CachedSequence) -> None:
        """Give back the blocks wholly before the window of the next token to compute (none without a window).
        Their entries stay in the table (its positions keep their blocks' places): the kernels read nothing
        before a token's window, and the torch backend reads them masked out, whatever they hold by then. The
        block before the current one stays, for the prefix cache's hashing of it (allocate_slots)."""
        if self.window is None:
            return
        first_read = seq.num_computed_tokens - self.window + 1  # the first key the next token attends to
        keep_from = min(first_read // self.block_size, seq.num_computed_tokens // self.block_size - 1)
        for index in range(seq.num_freed_blocks, keep_from):
            self.allocator.decref(seq.block_table[index])
        seq.num_freed_blocks = max(seq.num_freed_blocks, keep_from)

    def blocks_held(self, seq: CachedSequence) -> list[int]:
        """The blocks `seq` holds now, per KV layer group (stats and benchmarks)."""
        return [len(seq.block_table) - seq.num_freed_blocks]

    def forget(self, blocks: set[int]) -> None:
        """Blocks a failed step was to write: their K/V are not what their hashes promise, so the prefix cache
        must never hand them out (a later request with the same prompt would read garbage)."""
        for block in blocks:
            self.allocator.uncache(block)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def _full_block_hashes(self, seq: CachedSequence) -> list[bytes]:
        """Hashes of the sequence's full blocks, extended as it grows: sha256(parent hash + block tokens).

        A block cached during a step is looked up by sequences admitted in the same step; that is safe because
        every attention layer writes all new K/V of the step before any sequence reads the cache.
        """
        hashes = seq.block_hashes
        size = self.block_size
        for index in range(len(hashes), len(seq.token_ids) // size):
            parent = hashes[-1] if hashes else b""
            tokens = array("q", seq.token_ids[index * size:(index + 1) * size]).tobytes()
            hashes.append(hashlib.sha256(parent + tokens).digest()[:16])
        return hashes
