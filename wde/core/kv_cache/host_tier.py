"""The host tier of the prefix cache: which host-memory block holds the K/V of which full block, by the same
chained hash (and KV layer group) as the GPU's cache, least recently used first.

A cached GPU block about to be reused is copied here instead of forgotten (a spill), and so are the full blocks
of a sequence preempted by swap; a sequence whose prefix goes on past the GPU's hits into blocks held here (or a
swapped-out sequence resuming) gets fresh GPU blocks with those K/V copied back (a load) instead of computing
them again. The copies a step needs are collected here, and the Worker runs them before
the step's forward pass: spills first (the GPU blocks they read may be reused in the same step), then loads.
"""
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class BlockCopies:
    """The KV block copies between the tiers that a step runs before its forward pass, in this order."""

    spills: list[tuple[int, int]] = field(default_factory=list)  # (GPU block, host block)
    loads: list[tuple[int, int]] = field(default_factory=list)  # (host block, GPU block)

    def __bool__(self) -> bool:
        return bool(self.spills or self.loads)


class HostTier:
    def __init__(self, num_blocks: int, block_bytes: int = 0):
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes  # what one block holds, over every worker (the bytes a copy moves)
        self._held: OrderedDict[bytes, int] = OrderedDict()  # key -> host block, least recently used first
        self._free = list(range(num_blocks - 1, -1, -1))  # popped from the end: block 0 first
        self._copies = BlockCopies()
        self._loading_host: set[int] = set()  # host blocks read by this step's loads: not reused before
        self._loading_gpu: set[int] = set()  # GPU blocks written by this step's loads: nothing to spill yet
        # GPU block -> key, of the spills of this step and of the last (which may have read a block that the step
        # in flight before it was writing): if that step fails, what they copied is not what the key promises
        self._spilled_from: list[dict[int, bytes]] = [{}, {}]
        self.num_hit_blocks = 0  # found here by a prefix lookup, so copied back to the device
        self.num_spilled_blocks = 0  # copied here from the device

    @property
    def num_held(self) -> int:
        return len(self._held)

    def holds(self, key: bytes) -> bool:
        return key in self._held

    def spill(self, key: bytes, gpu_block: int) -> bool:
        """The GPU's `gpu_block` of `key` is about to be reused (or its sequence swapped out): keep a copy
        (unless one is held already, or the block's own K/V are still to be loaded in this step, or every host
        block is needed this step). Whether it copies the block."""
        if key in self._held:
            self._held.move_to_end(key)
            return False
        if gpu_block in self._loading_gpu:
            return False
        host_block = self._take_block()
        if host_block is None:
            return False
        self._held[key] = host_block
        self._copies.spills.append((gpu_block, host_block))
        self._spilled_from[-1][gpu_block] = key
        self.num_spilled_blocks += 1
        return True

    def load(self, key: bytes, gpu_block: int) -> None:
        """Copy the K/V held for `key` into `gpu_block` before this step runs."""
        host_block = self._held[key]
        self._held.move_to_end(key)
        self._copies.loads.append((host_block, gpu_block))
        self._loading_host.add(host_block)
        self._loading_gpu.add(gpu_block)
        self.num_hit_blocks += 1

    def take_copies(self) -> BlockCopies:
        """The copies this step's scheduling asked for (the next step's start afresh)."""
        copies, self._copies = self._copies, BlockCopies()
        self._loading_host, self._loading_gpu = set(), set()
        self._spilled_from = [self._spilled_from[-1], {}]
        return copies

    def drop(self, copies: BlockCopies) -> None:
        """`copies` never ran (their step was not launched, or failed): the host blocks they were to fill hold
        nothing, and are free again; the counters forget them."""
        self._free_host_blocks({host_block for _, host_block in copies.spills})
        self.num_spilled_blocks -= len(copies.spills)
        self.num_hit_blocks -= len(copies.loads)

    def forget(self, gpu_blocks: set[int]) -> None:
        """A failed step was to write `gpu_blocks`: a copy of one spilled since that step was launched holds
        what it wrote, or half of it, so no key may find it."""
        keys = {key for spilled in self._spilled_from for block, key in spilled.items() if block in gpu_blocks}
        self._free_host_blocks({self._held[key] for key in keys if key in self._held})

    def _free_host_blocks(self, host_blocks: set[int]) -> None:
        for key in [key for key, block in self._held.items() if block in host_blocks]:
            self._free.append(self._held.pop(key))

    def _take_block(self) -> int | None:
        """A free host block, else the least recently used one not read by this step's loads."""
        if self._free:
            return self._free.pop()
        for key, block in self._held.items():
            if block not in self._loading_host:
                del self._held[key]
                return block
        return None

    def free_blocks(self) -> set[int]:
        return set(self._free)

    def held_blocks(self) -> dict[bytes, int]:
        return dict(self._held)
