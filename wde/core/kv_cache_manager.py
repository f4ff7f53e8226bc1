"""Which KV-cache blocks hold which sequence's tokens (the bookkeeping; the tensors live in the Worker)."""
import logging
from typing import Protocol

from wde.core import interfaces
from wde.core.block_allocator import BlockAllocator
from wde.core.config import EngineConfig

logger = logging.getLogger(__name__)


class CachedSequence(Protocol):
    """What the manager needs of a sequence: its block table and how many of its tokens are in the cache."""

    block_table: list[int]
    num_computed_tokens: int


class KVCacheManager(interfaces.KVCacheManager):
    @classmethod
    def from_engine(cls, engine) -> "KVCacheManager":
        return cls(engine.config, engine.executor.num_kv_blocks)

    def __init__(self, config: EngineConfig, num_blocks: int):
        super().__init__(config)
        if config.args.enable_prefix_caching:
            raise NotImplementedError("enable_prefix_caching is not available yet in this version of wde")
        self.block_size = config.args.block_size
        self.allocator = BlockAllocator(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, seq: CachedSequence, num_new_tokens: int) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens; False (and nothing changed) if too few are free."""
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > self.allocator.num_free:
            return False
        for _ in range(needed):
            seq.block_table.append(self.allocator.allocate())
        return True

    def free(self, seq: CachedSequence) -> None:
        for block in reversed(seq.block_table):  # the tail first: it is the least likely to be shared
            self.allocator.decref(block)
        seq.block_table = []
