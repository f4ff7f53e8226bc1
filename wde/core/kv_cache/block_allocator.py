"""KV-cache blocks handed out by reference count, with a cache of full blocks that outlive their users.

A block whose last user lets go is free. If it holds a full, hashed block of some prefix it stays findable by
that hash (`lookup`) until a new allocation needs it: plain free blocks go first, then the cached ones, least
recently used first. A cached block reused so is handed to `spill` first (the host tier keeps a copy).
"""
from collections import OrderedDict, deque
from typing import Callable


class BlockAllocator:
    def __init__(self, num_blocks: int, spill: Callable[[bytes, int], None] | None = None):
        self.num_blocks = num_blocks
        self.spill = spill  # (block hash, block): called as a cached block is taken for new contents
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # free and holding nothing worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached, least recently used first
        self._cached: dict[bytes, int] = {}  # block hash -> block

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def free_blocks(self) -> set[int]:
        return set(self._free) | set(self._evictable)

    def allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            if self.spill is not None:
                self.spill(self.block_hashes[block], block)
            del self._cached[self.block_hashes[block]]
            self.block_hashes[block] = None
        else:
            raise RuntimeError("no free KV-cache block")  # callers check num_free first
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        """One more user of `block`, which may be a free cached block coming back into use."""
        if self.ref_counts[block] == 0:
            del self._evictable[block]
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        count = self.ref_counts[block]
        if count <= 0:
            raise RuntimeError(f"KV-cache block {block} freed more often than it was allocated")
        self.ref_counts[block] = count - 1
        if count == 1:
            if self.block_hashes[block] is None:
                self._free.append(block)
            else:
                self._evictable[block] = None

    def lookup(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    def cache(self, block: int, block_hash: bytes) -> None:
        """Make `block` findable by `block_hash` (unless another block already holds the same content)."""
        if block_hash not in self._cached and self.block_hashes[block] is None:
            self._cached[block_hash] = block
            self.block_hashes[block] = block_hash

    def uncache(self, block: int) -> None:
        """`block` no longer holds what its hash says (the step that was to write it failed): no lookup finds it
        again, and once free it is a plain free block."""
        block_hash = self.block_hashes[block]
        if block_hash is None:
            return
        if self._cached.get(block_hash) == block:
            del self._cached[block_hash]
        self.block_hashes[block] = None
        if block in self._evictable:
            del self._evictable[block]
            self._free.append(block)
