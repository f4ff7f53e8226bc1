"""Many small tensors as one byte buffer, host or device: each tensor's bytes start at a multiple of ALIGN, so
they can be viewed in place as its dtype and shape. Used to move a step's input in one transfer."""
import math

import torch

# a multiple of every element size; and 16, because Triton compiles a kernel once per alignment of its pointer
# arguments (16 bytes or not): views that were 16-aligned only in some steps would compile kernels mid-run
ALIGN = 16


def padded_nbytes(dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> int:
    return -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN


def layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """(each tensor's byte offset, the buffer's size)."""
    offsets, size = [], 0
    for tensor in tensors:
        offsets.append(size)
        size += padded_nbytes(tensor.dtype, tensor.shape)
    return offsets, size


def pack_into(buffer: torch.Tensor, tensors: list[torch.Tensor], offsets: list[int]) -> None:
    """Copy each (host) tensor's bytes into the uint8 host `buffer` at its offset.

    Through numpy, a plain memcpy: torch splits a copy past 32k elements over its OpenMP threads, whose start
    and spinning cost milliseconds per step when every tensor-parallel rank's process does it at once."""
    target = buffer.numpy()
    for tensor, offset in zip(tensors, offsets):
        data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
        target[offset:offset + len(data)] = data


def views(buffer: torch.Tensor, specs: list[tuple[torch.dtype, list[int]]], offsets: list[int]) -> list[torch.Tensor]:
    """The tensors packed in the uint8 `buffer`, as views of it (no copies), from their (dtype, shape)."""
    return [buffer[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for (dtype, shape), offset in zip(specs, offsets)]
