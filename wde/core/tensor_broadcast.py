"""Rank 0 sends each step's model input to the other ranks as tensors.

An input is a tree of dataclasses, lists and tensors. Its structure (field names, dtypes, small values) is
pickled only when it differs from the last step's; every step sends a header of tensor shapes and then the
tensors themselves through torch.distributed broadcasts (NCCL on GPUs, gloo on CPUs). Lists of ints (the
metadata's host-side lengths) travel as tensors too.
"""
import dataclasses
import pickle
from typing import Any

import torch
import torch.distributed as dist

from wde.core.dotted_path import import_object

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
        return tensors.pop(0)
    if kind == "ints":
        return tensors.pop(0).tolist()
    if kind == "dataclass":
        return import_object(skeleton[1])(**{name: _rebuild(child, tensors) for name, child in skeleton[2]})
    if kind in ("list", "tuple"):
        items = [_rebuild(child, tensors) for child in skeleton[1]]
        return items if kind == "list" else tuple(items)
    return skeleton[1]


class TensorBroadcaster:
    """Both ends: rank 0 calls send(), the other ranks receive(), step after step, in the same order."""

    def __init__(self, device: torch.device):
        self.device = device
        self.skeleton_bytes: bytes | None = None
        self.skeleton = None

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device)
        dist.broadcast(tensor, src=0)
        return tensor

    def send(self, obj: Any) -> None:
        tensors: list[torch.Tensor] = []
        skeleton_bytes = pickle.dumps(_flatten(obj, tensors))
        new_structure = skeleton_bytes != self.skeleton_bytes
        self.skeleton_bytes = skeleton_bytes
        header = [int(new_structure), len(skeleton_bytes), len(tensors)]
        for tensor in tensors:
            header += [DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape]
        self._broadcast(torch.tensor([len(header)], dtype=torch.int64))
        self._broadcast(torch.tensor(header, dtype=torch.int64))
        if new_structure:
            self._broadcast(torch.frombuffer(bytearray(skeleton_bytes), dtype=torch.uint8))
        for tensor in tensors:
            self._broadcast(tensor.contiguous())

    def send_stop(self) -> None:
        self._broadcast(torch.tensor([STOP], dtype=torch.int64))

    def receive(self) -> Any:
        """The next step's input, or None when rank 0 stops."""
        length = int(self._broadcast(torch.zeros(1, dtype=torch.int64)))
        if length == STOP:
            return None
        header = self._broadcast(torch.zeros(length, dtype=torch.int64)).tolist()
        new_structure, skeleton_size, num_tensors = header[:3]
        if new_structure:
            raw = self._broadcast(torch.zeros(skeleton_size, dtype=torch.uint8))
            self.skeleton = pickle.loads(raw.cpu().numpy().tobytes())
        tensors, position = [], 3
        for _ in range(num_tensors):
            dtype, ndim = DTYPES[header[position]], header[position + 1]
            shape = header[position + 2:position + 2 + ndim]
            position += 2 + ndim
            tensors.append(self._broadcast(torch.empty(shape, dtype=dtype)))
        return _rebuild(self.skeleton, tensors)
