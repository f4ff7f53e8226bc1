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
from wde.core.kv_cache.host_tier import BlockCopies, HostTier

logger = logging.getLogger(__name__)


class CachedSequence(Protocol):
    """What the manager needs of a sequence."""

    token_ids: "list[int] | array"  # ints, as a list or an array("q")
    block_table: list[int]  # of the first KV layer group (the only one of most models)
    block_hashes: list[bytes]  # of its full blocks, filled in by the manager
    num_computed_tokens: int  # tokens whose K/V are in its blocks (the scheduler writes it)
    num_freed_blocks: int  # the first entries of block_table given back (free_outside_window); the manager's
    group_tables: list[list[int]]  # the tables of the other KV layer groups, as long as block_table; the manager's
    group_freed_blocks: list[int]  # num_freed_blocks of each of those; the manager's


class KVCacheManager(interfaces.KVCacheManager):
    """Every table of a sequence has an entry per block of its tokens, in every KV layer group
    (wde/core/kv_cache/layer_groups.py): a group's entries before its window's first block are given back as the
    window moves on (or, on a prefix hit, stand for blocks never taken), and kept in place so that positions keep
    their blocks' places; the kernels never read them. A group caches its full blocks under its own keys, so a
    prefix hit takes from each group what its layers read: the windowed groups only their window's blocks."""

    @classmethod
    def from_engine(cls, engine) -> "KVCacheManager":
        executor = engine.executor
        return cls(engine.config, executor.num_kv_blocks, executor.kv_layer_groups.windows,
                   executor.num_host_kv_blocks, executor.host_kv_block_bytes)

    def __init__(self, config: EngineConfig, num_blocks: int, group_windows: tuple[int | None, ...] = (None,),
                 num_host_blocks: int = 0, host_block_bytes: int = 0):
        super().__init__(config)
        self.block_size = config.args.block_size
        self.group_windows = group_windows  # per KV layer group: the window its layers read within, or None
        self.enable_prefix_caching = config.args.enable_prefix_caching
        self.swaps_preempted = config.args.swaps_preempted and bool(num_host_blocks)
        self.host_tier = HostTier(num_host_blocks, host_block_bytes) if num_host_blocks else None
        if self.host_tier is not None and group_windows != (None,):
            raise ValueError("the KV cache's host tier (kv_offload_gib) serves models whose attention layers all "
                             f"read the whole context; this one has sliding windows {list(group_windows)}")
        self.allocator = BlockAllocator(num_blocks, self.host_tier.spill if self.host_tier else None)
        self.num_queried_tokens = 0  # tokens looked up in the prefix cache
        self.num_hit_tokens = 0  # of which found (on the GPU or in the host tier)

    @property
    def window(self) -> int | None:
        """The window every layer reads within, when they share one: a sequence then holds about a window's
        blocks however long it grows. None when some layer reads the whole context."""
        windows = set(self.group_windows)
        return windows.pop() if len(windows) == 1 else None

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def longest_sequence(self, max_step_tokens: int, max_model_len: int) -> int:
        """The most tokens one sequence can reach alone in the cache (up to max_model_len): a sequence that fits
        alone can always run, after preempting the others. A windowed group holds at most the blocks of its
        window and of one step's tokens, and two more (the block before the current one, and a partial one)."""
        windowed_peaks = [self.blocks_for(window + max_step_tokens) + 2 for window in self.group_windows
                          if window is not None]
        num_global = len(self.group_windows) - len(windowed_peaks)

        def fits(num_tokens: int) -> bool:
            blocks = self.blocks_for(num_tokens)
            return num_global * blocks + sum(min(blocks, peak) for peak in windowed_peaks) <= self.num_blocks
        low, high = 0, max_model_len  # the longest length that fits, by bisection (fits() only grows with it)
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle) else (low, middle - 1)
        return low

    def allocate_cached_prefix(self, seq: CachedSequence, max_new_tokens: int) -> int:
        """At admission, share the cached blocks that hold the start of `seq`; return the tokens reused.
        `max_new_tokens`: the most the step computes for it after them (blocks are loaded from the host tier
        only as far as they leave room for those: a load whose sequence is not admitted would be wasted).

        At least one token is always left to compute: its logits give the next token. Without prefix caching,
        only a sequence swapped out at preemption finds its own blocks, in the host tier.
        """
        if seq.block_table or not (self.enable_prefix_caching or self.swaps_preempted and seq.block_hashes):
            return 0
        hashes = self._full_block_hashes(seq)[:(len(seq.token_ids) - 1) // self.block_size]
        num_hit_blocks = self._longest_cached_prefix(hashes) if self.enable_prefix_caching else 0
        tables = self._tables(seq)
        for group, window in enumerate(self.group_windows if num_hit_blocks else ()):
            first = self._first_block_kept(num_hit_blocks * self.block_size, window)
            hits = [self.allocator.lookup(self._key(block_hash, group)) for block_hash in hashes[first:num_hit_blocks]]
            for block in hits:
                self.allocator.incref(block)
            tables[group][:] = [hits[0]] * first + hits  # entries before its window: never read, not held
            self._set_freed(seq, group, first)
        num_hit_blocks += self._load_from_host(seq, hashes[num_hit_blocks:], max_new_tokens)
        return num_hit_blocks * self.block_size  # the scheduler's to record: it owns num_computed_tokens

    def _load_from_host(self, seq: CachedSequence, hashes: list[bytes], max_new_tokens: int) -> int:
        """Past the GPU's hits, the blocks of `hashes` the host tier holds, in order, each copied into a fresh
        GPU block (cached at once, with prefix caching: a sequence admitted later in the step shares it), as
        many as leave free blocks for the step's `max_new_tokens` after them; how many."""
        if self.host_tier is None:
            return 0
        held = next((i for i, block_hash in enumerate(hashes) if not self.host_tier.holds(block_hash)), len(hashes))
        start = len(seq.block_table)

        def blocks_taken(num_loaded: int) -> int:  # by the loads and the step's new tokens after them
            computed = (start + num_loaded) * self.block_size
            return self.blocks_for(min(len(seq.token_ids), computed + max_new_tokens)) - start
        while held and blocks_taken(held) > self.allocator.num_free:
            held -= 1
        for loaded, block_hash in enumerate(hashes[:held]):
            block = self.allocator.allocate()
            if not self.host_tier.holds(block_hash):  # the spill that freed a GPU block took its host block
                self.allocator.decref(block)
                return loaded
            if self.enable_prefix_caching:
                self.allocator.cache(block, block_hash)
            self.host_tier.load(block_hash, block)
            seq.block_table.append(block)
        return held

    def swap_out(self, seq: CachedSequence) -> int:
        """`seq` is preempted (its blocks are about to be freed): copy its full blocks, of known tokens and
        computed K/V, to the host tier (those it does not hold yet), where it finds them when it resumes; how
        many it copies. (Run before the step's forward pass like every spill, the copies read the blocks before
        anything reuses them, and after the step in flight that may still be writing them.)"""
        if not self.swaps_preempted:
            return 0
        hashes = self._full_block_hashes(seq)
        num_full = min(len(hashes), seq.num_computed_tokens // self.block_size)
        return sum(self.host_tier.spill(hashes[i], seq.block_table[i]) for i in range(num_full))

    def take_copies(self) -> BlockCopies:
        """The copies between the tiers the step just scheduled needs before its forward pass."""
        return self.host_tier.take_copies() if self.host_tier is not None else BlockCopies()

    def drop_copies(self, copies: BlockCopies) -> None:
        """A step's copies that never ran: the host tier forgets what they were to fill, the GPU's cache the
        blocks they were to load."""
        if self.host_tier is not None and copies:
            self.host_tier.drop(copies)
            self.forget({gpu_block for _, gpu_block in copies.loads})

    def _longest_cached_prefix(self, hashes: list[bytes]) -> int:
        """The most leading blocks of which every group finds the ones its layers read in the cache."""
        found = len(hashes)
        for group, window in enumerate(self.group_windows):
            if window is None:  # a global group reads every block of the prefix
                found = next((i for i in range(found) if self.allocator.lookup(self._key(hashes[i], group)) is None),
                             found)
        while found:  # each windowed group reads the blocks of the window before the first token to compute
            missing = [i for group, window in enumerate(self.group_windows) if window is not None
                       for i in range(self._first_block_kept(found * self.block_size, window), found)
                       if self.allocator.lookup(self._key(hashes[i], group)) is None]
            if not missing:
                return found
            found = max(missing)
        return 0

    def count_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Account one admitted sequence's lookup in the hit rate (failed admissions are retried, not counted)."""
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens

    def allocate_slots(self, seq: CachedSequence, num_new_tokens: int) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens in every group; False (and nothing changed) if too
        few are free."""
        tables = self._tables(seq)
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed * len(tables) > self.allocator.num_free:
            return False
        for table in tables:
            for _ in range(needed):
                table.append(self.allocator.allocate())
        if self.enable_prefix_caching:  # blocks this step fills are findable from now on (see below)
            hashes = self._full_block_hashes(seq)
            full_before = seq.num_computed_tokens // self.block_size
            full_after = (seq.num_computed_tokens + num_new_tokens) // self.block_size
            # a block whose last token was still being sampled (async scheduling) had no hash at the last call:
            # it is cached now (cache() ignores a block already cached)
            for group, table in enumerate(tables):
                for index in range(max(0, full_before - 1), min(full_after, len(hashes))):
                    self.allocator.cache(table[index], self._key(hashes[index], group))
        return True

    def free(self, seq: CachedSequence) -> None:
        for group, table in enumerate(self._tables(seq)):
            for block in reversed(table[self._freed(seq, group):]):  # the tail first: least likely shared
                self.allocator.decref(block)
        seq.block_table, seq.num_freed_blocks, seq.group_tables, seq.group_freed_blocks = [], 0, [], []

    def free_outside_window(self, seq: CachedSequence) -> None:
        """Give back the blocks wholly before the window of the next token to compute, in each windowed group.
        The block before the current one stays, for the prefix cache's hashing of it (allocate_slots)."""
        for group, (window, table) in enumerate(zip(self.group_windows, self._tables(seq))):
            if window is None:
                continue
            keep_from = self._first_block_kept(seq.num_computed_tokens, window)
            freed = self._freed(seq, group)
            for index in range(freed, keep_from):
                self.allocator.decref(table[index])
            self._set_freed(seq, group, max(freed, keep_from))

    def blocks_held(self, seq: CachedSequence) -> list[int]:
        """The blocks `seq` holds now, per KV layer group (stats and benchmarks)."""
        return [len(table) - self._freed(seq, group) for group, table in enumerate(self._tables(seq))]

    def _first_block_kept(self, num_computed_tokens: int, window: int | None) -> int:
        """The first block a group with this window keeps before computing position num_computed_tokens: the
        first its layers read from there, and at the latest the block before the current one, whose hash
        allocate_slots may still cache (so a window shorter than a block still holds a block it filled)."""
        if window is None:
            return 0
        first_read = max(0, num_computed_tokens - window + 1) // self.block_size
        return max(0, min(first_read, num_computed_tokens // self.block_size - 1))

    def _tables(self, seq: CachedSequence) -> list[list[int]]:
        """The sequence's block table in each group (the other groups' made empty on its first call)."""
        if len(seq.group_tables) != len(self.group_windows) - 1:
            seq.group_tables = [[] for _ in self.group_windows[1:]]
            seq.group_freed_blocks = [0] * len(seq.group_tables)
        return [seq.block_table, *seq.group_tables]

    @staticmethod
    def _freed(seq: CachedSequence, group: int) -> int:
        return seq.group_freed_blocks[group - 1] if group else seq.num_freed_blocks

    @staticmethod
    def _set_freed(seq: CachedSequence, group: int, count: int) -> None:
        if group:
            seq.group_freed_blocks[group - 1] = count
        else:
            seq.num_freed_blocks = count

    @staticmethod
    def _key(block_hash: bytes, group: int) -> bytes:
        """A group's key of a block of this hash: the same tokens hold other layers' K/V in each group."""
        return block_hash + bytes([group]) if group else block_hash

    def forget(self, blocks: set[int]) -> None:
        """Blocks a failed step was to write: their K/V are not what their hashes promise, so the prefix cache
        must never hand them out (a later request with the same prompt would read garbage); nor may the host
        tier, of copies it took from them."""
        for block in blocks:
            self.allocator.uncache(block)
        if self.host_tier is not None:
            self.host_tier.forget(blocks)

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
