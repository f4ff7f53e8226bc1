"""A step's input, built on the host as a tree of dataclasses, tuples and tensors, moved to the device in one copy.

Why not `tensor.to(device, non_blocking=True)` for each tensor: a copy from pageable memory may make the host
wait until the GPU reaches it, that is until the step before it has run, which undoes async scheduling (the
decode step's block tables alone pass 100 KB at 512 sequences); and eight copies cost eight launches. Here the
tensors are packed into pinned memory (a ring of two buffers: the host runs at most one step ahead), copied to
one device buffer with one launch, and replaced by views of it. The device buffer is reused by the next step:
its copy is queued on the same stream, behind every kernel that reads this step's views.
"""
import dataclasses
from typing import Any, Callable

import torch

from wde.core.packing import layout, pack_into, views

RING = 2


def map_tensors(obj: Any, change: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`obj` with each tensor in its dataclasses, tuples and lists replaced by change(tensor), in a fixed order.
    Lists of plain values (the host-side lengths) and dicts are kept as they are."""
    if isinstance(obj, torch.Tensor):
        return change(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: map_tensors(getattr(obj, f.name), change) for f in dataclasses.fields(obj) if f.init}
        return type(obj)(**fields)
    if isinstance(obj, tuple):
        return tuple(map_tensors(item, change) for item in obj)
    if isinstance(obj, list) and obj and not isinstance(obj[0], (int, float, str)):
        return [map_tensors(item, change) for item in obj]
    return obj


def copy_to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Starts the copy to pinned host memory on the current stream and returns at once (the caller records an
    event and waits on it before reading the result)."""
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _grown(size: int) -> int:
    return max(1 << 16, 1 << (size - 1).bit_length())  # powers of two: a few sizes over a whole run


class PinnedRing:
    """RING pinned host buffers taken in turn by copies to the device that must not make the host wait: a
    buffer is handed out again once the copy that last read it finished."""

    def __init__(self):
        self.pinned = [torch.empty(0, dtype=torch.uint8) for _ in range(RING)]
        self.copied: list[torch.cuda.Event | None] = [None] * RING
        self.turn = 0

    def take(self, size: int) -> torch.Tensor:
        """The next buffer, of at least `size` bytes (uint8); call copied_out() once its copy is queued."""
        self.turn = (self.turn + 1) % RING
        if self.copied[self.turn] is not None:
            self.copied[self.turn].synchronize()
        if self.pinned[self.turn].numel() < size:
            self.pinned[self.turn] = torch.empty(_grown(size), dtype=torch.uint8, pin_memory=True)
        return self.pinned[self.turn]

    def copied_out(self) -> None:
        """The copy from the buffer taken last is queued on the current stream."""
        self.copied[self.turn] = torch.cuda.Event()
        self.copied[self.turn].record()


class PinnedCopier:
    def __init__(self, device: torch.device):
        self.device = device
        self.ring = PinnedRing()
        self.on_device = torch.empty(0, dtype=torch.uint8, device=device)

    def to_device(self, obj: Any) -> Any:
        """`obj` with its host tensors moved to the device (unchanged off CUDA, where they are already there)."""
        if self.device.type != "cuda":
            return obj
        host: list[torch.Tensor] = []

        def collect(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.device.type == "cpu":
                host.append(tensor)
            return tensor
        map_tensors(obj, collect)
        offsets, size = layout(host)
        pinned = self.ring.take(size)
        pack_into(pinned, host, offsets)
        if self.on_device.numel() < size:
            self.on_device = torch.empty(_grown(size), dtype=torch.uint8, device=self.device)
        self.on_device[:size].copy_(pinned[:size], non_blocking=True)
        self.ring.copied_out()
        moved = iter(views(self.on_device, [(t.dtype, list(t.shape)) for t in host], offsets))
        return map_tensors(obj, lambda t: next(moved) if t.device.type == "cpu" else t)
