"""Rank 0 sends each step's model input to the other ranks as tensors, host to host.

An input is a tree of dataclasses, lists and tensors, built on rank 0's host. Its structure (field names,
dtypes, small values) is pickled only when it differs from the last step's; every step otherwise costs two
broadcasts on the group's host (gloo) side: the sizes, then one byte buffer holding a header of tensor shapes
and every tensor's bytes. Lists of ints (the metadata's host-side lengths) travel as tensors too.

Why the host and not NCCL: a rank that received its input on the GPU would have to wait for its GPU (to read
shapes and host-side lengths back) before it could launch the step. Received on the host, each rank copies
its input to its device itself, like rank 0, and launches at once.
"""
import dataclasses
import pickle
from functools import cache
from typing import Any

import torch
import torch.distributed as dist

from wde.core.dotted_path import import_object
from wde.core.packing import layout, pack_into, padded_nbytes, views
from wde.core.parallel.distributed import get_host_group

DTYPES = [torch.int64, torch.int32, torch.float32, torch.bfloat16, torch.float16, torch.bool, torch.uint8]
STOP = -1


def _flatten(obj: Any, tensors: list[torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return ("tensor",)
    if isinstance(obj, list) and obj and all(type(x) is int for x in obj):
        tensors.append(torch.tensor(obj, dtype=torch.int64))
        return ("ints",)
    if dataclasses.is_dataclass(obj):
        cls = type(obj)
        return ("dataclass", f"{cls.__module__}:{cls.__qualname__}",
                [(f.name, _flatten(getattr(obj, f.name), tensors)) for f in dataclasses.fields(obj)])
    if isinstance(obj, (list, tuple)):
        return ("list" if isinstance(obj, list) else "tuple", [_flatten(x, tensors) for x in obj])
    return ("value", obj)


def _rebuild(skeleton, tensors: list[torch.Tensor]):
    kind = skeleton[0]
    if kind == "tensor":
        return tensors.pop()
    if kind == "ints":
        return tensors.pop().tolist()
    if kind == "dataclass":
        return _class(skeleton[1])(**{name: _rebuild(child, tensors) for name, child in skeleton[2]})
    if kind in ("list", "tuple"):
        items = [_rebuild(child, tensors) for child in skeleton[1]]
        return items if kind == "list" else tuple(items)
    return skeleton[1]


@cache
def _class(path: str) -> type:
    return import_object(path)


def _pack(tensors: list[torch.Tensor], skeleton_bytes: bytes) -> tuple[list[int], torch.Tensor]:
    """(sizes, buffer): the buffer is the header (int64s), the packed tensors, then the skeleton."""
    header = []
    for tensor in tensors:
        header += [DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape]
    header_bytes = torch.tensor(header, dtype=torch.int64).view(torch.uint8)
    offsets, payload_size = layout(tensors)
    buffer = torch.empty(len(header_bytes) + payload_size + len(skeleton_bytes), dtype=torch.uint8)
    buffer[:len(header_bytes)] = header_bytes
    pack_into(buffer[len(header_bytes):], [t.cpu() for t in tensors], offsets)
    if skeleton_bytes:
        buffer[len(header_bytes) + payload_size:] = torch.frombuffer(bytearray(skeleton_bytes), dtype=torch.uint8)
    return [len(header), payload_size, len(skeleton_bytes)], buffer


def _unpack(buffer: torch.Tensor, header_len: int, payload_size: int) -> tuple[list[torch.Tensor], bytes]:
    header = buffer[:header_len * 8].view(torch.int64).tolist()
    specs, offsets, position, index = [], [], 0, 0
    while index < len(header):
        dtype, ndim = DTYPES[header[index]], header[index + 1]
        shape = header[index + 2:index + 2 + ndim]
        index += 2 + ndim
        specs.append((dtype, shape))
        offsets.append(position)
        position += padded_nbytes(dtype, shape)
    payload = buffer[header_len * 8:header_len * 8 + payload_size]
    return views(payload, specs, offsets), buffer[header_len * 8 + payload_size:].numpy().tobytes()


class TensorBroadcaster:
    """Both ends: rank 0 calls send(), the other ranks receive(), step after step, in the same order."""

    def __init__(self):
        self.skeleton_bytes: bytes | None = None
        self.skeleton = None

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        # the group is looked up at each call, never held: a group object that outlives
        # destroy_tensor_parallel is freed at interpreter exit, where gloo's threads abort the process
        dist.broadcast(tensor, src=0, group=get_host_group())
        return tensor

    def send(self, obj: Any) -> None:
        tensors: list[torch.Tensor] = []
        skeleton_bytes = pickle.dumps(_flatten(obj, tensors))
        new_structure = skeleton_bytes != self.skeleton_bytes
        self.skeleton_bytes = skeleton_bytes
        sizes, buffer = _pack(tensors, skeleton_bytes if new_structure else b"")
        self._broadcast(torch.tensor(sizes, dtype=torch.int64))
        self._broadcast(buffer)

    def send_stop(self) -> None:
        self._broadcast(torch.tensor([STOP, 0, 0], dtype=torch.int64))

    def receive(self) -> Any:
        """The next step's input (tensors on the host), or None when rank 0 stops."""
        header_len, payload_size, skeleton_size = self._broadcast(torch.zeros(3, dtype=torch.int64)).tolist()
        if header_len == STOP:
            return None
        buffer = self._broadcast(torch.empty(header_len * 8 + payload_size + skeleton_size, dtype=torch.uint8))
        tensors, skeleton_bytes = _unpack(buffer, header_len, payload_size)
        if skeleton_bytes:
            self.skeleton = pickle.loads(skeleton_bytes)
        tensors.reverse()  # _rebuild pops them in order from the end
        return _rebuild(self.skeleton, tensors)
