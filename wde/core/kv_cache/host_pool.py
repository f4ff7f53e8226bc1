"""The host tier's K/V (wde/core/kv_cache/host_tier.py keeps its bookkeeping): one tensor of host blocks, pinned
beside a GPU, and the copies a step asks for between it and the device's cache.

On a GPU the copies run on two side streams. A spill gathers its blocks on the compute stream (a fast device
copy, before the step's forward pass may overwrite them) and crosses to the host on the spill stream, behind
the step's kernels, which never wait for it. A load crosses on the load stream, after the spills into the
host blocks it reads (if they are still crossing), and the compute stream waits for it only before writing it
into the cache that step reads. On a CPU both are plain copies.

How long the step waited on loads is kept (`wait_s`): on a GPU from two timing events per step with loads, when
the compute stream reached its wait and when the loads ended; on a CPU the loads' own time.
"""
import time

import torch

from wde.core.kv_cache.host_tier import BlockCopies


def available_host_memory() -> int | None:
    """Bytes of host memory that can be allocated without swapping (Linux's MemAvailable), None elsewhere."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_tier_shortfall(num_bytes: int, ranks_on_host: int = 1) -> str | None:
    """Why a host tier of `num_bytes` per rank, for `ranks_on_host` ranks pinning as much each, does not fit this
    host's available memory; None where it does (or where the memory cannot be read)."""
    available, total = available_host_memory(), num_bytes * ranks_on_host
    if available is None or total <= available:
        return None
    ranks = f" for each of {ranks_on_host} ranks on this host" if ranks_on_host > 1 else ""
    return (f"the KV cache's host tier ({num_bytes / 2**30:.2f} GiB{ranks}) does not fit the "
            f"{available / 2**30:.2f} GiB of host memory available: lower kv_offload_gib or num_kv_offload_blocks")


def runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(index into pairs, first host block, count) for each stretch of pairs whose host blocks follow one
    another: one copy each instead of one per block."""
    stretches: list[tuple[int, int, int]] = []
    for index, (host_block, _) in enumerate(pairs):
        if stretches and stretches[-1][1] + stretches[-1][2] == host_block:
            start, first, count = stretches[-1]
            stretches[-1] = (start, first, count + 1)
        else:
            stretches.append((index, host_block, 1))
    return stretches


class HostKVPool:
    def __init__(self, kv_cache: torch.Tensor, num_blocks: int):
        """kv_cache: the device's [layers a block holds, 2, blocks, block_size, kv_heads, head_dim]."""
        # a float8 cache is moved as its bytes: index_copy_ has no float8 kernel on the CPU
        self.kv_cache = kv_cache.view(torch.uint8) if kv_cache.dtype == torch.float8_e4m3fn else kv_cache
        kv_cache = self.kv_cache
        on_gpu = kv_cache.is_cuda
        block_shape = (*kv_cache.shape[:2], *kv_cache.shape[3:])
        # tensor-parallel ranks have checked that all of theirs fit together (agree_on_kv_blocks)
        if shortfall := host_tier_shortfall(num_blocks * kv_cache[:, :, 0].numel() * kv_cache.element_size()):
            raise ValueError(shortfall)
        # block-major: each host block is one contiguous stretch, so a run of them crosses in one copy
        self.blocks = torch.zeros(num_blocks, *block_shape, dtype=kv_cache.dtype, pin_memory=on_gpu)
        self.spill_stream = torch.cuda.Stream(kv_cache.device) if on_gpu else None
        self.load_stream = torch.cuda.Stream(kv_cache.device) if on_gpu else None
        self.spills_crossing: dict[int, torch.cuda.Event] = {}  # host block -> its last spill's end
        self._waited_s = 0.0  # of the loads whose events have been read
        self._waits: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # (compute ready, loads ended), unread

    @property
    def num_bytes(self) -> int:
        return self.blocks.numel() * self.blocks.element_size()

    def run(self, copies: BlockCopies) -> None:
        """The step's copies, spills before loads (a GPU block spilled may be the target of a load)."""
        if copies.spills:
            self._spill([(host, gpu) for gpu, host in copies.spills])
        if copies.loads:
            self._load(copies.loads)

    def _spill(self, pairs: list[tuple[int, int]]) -> None:
        gpu_blocks = torch.tensor([gpu for _, gpu in pairs], device=self.kv_cache.device)
        gathered = self.kv_cache.index_select(2, gpu_blocks).movedim(2, 0).contiguous()
        if self.spill_stream is None:
            self._copy_runs(pairs, self.blocks, gathered, to_host=True)
            return
        self.spill_stream.wait_stream(torch.cuda.current_stream(self.kv_cache.device))
        with torch.cuda.stream(self.spill_stream):
            self._copy_runs(pairs, self.blocks, gathered, to_host=True)
        gathered.record_stream(self.spill_stream)  # kept until the spill stream has read it
        crossed = self.spill_stream.record_event()
        self.spills_crossing = {block: event for block, event in self.spills_crossing.items() if not event.query()}
        self.spills_crossing.update((host, crossed) for host, _ in pairs)

    def wait_s(self) -> float:
        """Seconds the steps have waited on loads, of the loads that have ended."""
        unread = []
        for ready, loaded in self._waits:
            if loaded.query() and ready.query():
                self._waited_s += max(0.0, ready.elapsed_time(loaded)) / 1000
            else:
                unread.append((ready, loaded))
        self._waits = unread
        return self._waited_s

    def _load(self, pairs: list[tuple[int, int]]) -> None:
        start = time.perf_counter()
        gpu_blocks = torch.tensor([gpu for _, gpu in pairs], device=self.kv_cache.device)
        if self.load_stream is None:
            staged = torch.empty(len(pairs), *self.blocks.shape[1:], dtype=self.blocks.dtype)
            self._copy_runs(pairs, self.blocks, staged, to_host=False)
        else:
            self.wait_s()  # reads the events of earlier steps' loads that have ended
            for event in {id(e): e for host, _ in pairs if (e := self.spills_crossing.get(host))}.values():
                self.load_stream.wait_event(event)
            with torch.cuda.stream(self.load_stream):
                staged = torch.empty(len(pairs), *self.blocks.shape[1:], dtype=self.blocks.dtype,
                                     device=self.kv_cache.device)
                self._copy_runs(pairs, self.blocks, staged, to_host=False)
            compute = torch.cuda.current_stream(self.kv_cache.device)
            loaded = self.load_stream.record_event(torch.cuda.Event(enable_timing=True))
            self._waits.append((compute.record_event(torch.cuda.Event(enable_timing=True)), loaded))
            compute.wait_stream(self.load_stream)
            staged.record_stream(compute)
        self.kv_cache.index_copy_(2, gpu_blocks, staged.movedim(0, 2))
        if self.load_stream is None:
            self._waited_s += time.perf_counter() - start

    @staticmethod
    def _copy_runs(pairs: list[tuple[int, int]], host: torch.Tensor, device_side: torch.Tensor,
                   to_host: bool) -> None:
        for start, first, count in runs(pairs):
            host_part, device_part = host[first:first + count], device_side[start:start + count]
            if to_host:
                host_part.copy_(device_part, non_blocking=True)
            else:
                device_part.copy_(host_part, non_blocking=True)
