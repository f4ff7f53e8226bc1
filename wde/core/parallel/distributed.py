"""The tensor-parallel group this process belongs to (rank 0 of 1 unless an executor set up more), and the
collectives the parallel layers use. NCCL on GPUs, gloo on CPUs; torchrun's environment works the same way."""
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from wde.core.parallel.symmetric_all_reduce import SymmetricAllReduce, try_symmetric_all_reduce


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    host_group: dist.ProcessGroup | None = None  # gloo, for what travels between the ranks' hosts
    device_all_reduce: SymmetricAllReduce | None = None  # set up by init_device_all_reduce where GPUs allow
    expert_parallel: bool = False  # MoE layers: whole experts per rank, not a slice of every expert


_state = ParallelState()


def get_tp_rank() -> int:
    return _state.rank


def get_tp_size() -> int:
    return _state.world_size


def get_expert_parallel() -> bool:
    """Whether mixture-of-experts layers hold whole experts per rank (enable_expert_parallel over 2+ ranks)."""
    return _state.expert_parallel and _state.world_size > 1


TIMEOUT = timedelta(seconds=120)  # how long a collective waits for a rank that stopped answering


def init_tensor_parallel(rank: int, world_size: int, device: torch.device, store: dist.Store | None = None,
                         expert_parallel: bool = False) -> None:
    """Join the group: through `store` (made by the executor), or through torchrun's environment."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if store is None:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=TIMEOUT)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=TIMEOUT)
    _state.rank, _state.world_size, _state.expert_parallel = rank, world_size, expert_parallel
    _state.host_group = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend == "nccl" else dist.group.WORLD


def destroy_tensor_parallel(timeout_s: float = 5.0) -> None:
    """Leave the group. NCCL's teardown can block once a peer has exited, so it gets `timeout_s` in a thread and
    is then abandoned: closing an engine must never hang. Gloo's is local and is waited for: a gloo group still
    alive when the interpreter exits aborts the process (its threads free tensors after Python is gone)."""
    if dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()
    elif dist.is_initialized():
        teardown = threading.Thread(target=dist.destroy_process_group, daemon=True)
        teardown.start()
        teardown.join(timeout_s)
    _state.rank, _state.world_size, _state.host_group, _state.device_all_reduce = 0, 1, None, None
    _state.expert_parallel = False


def init_device_all_reduce(max_numel: int, dtype: torch.dtype, device: torch.device) -> None:
    """Collective: on GPUs of one host, all-reduces of up to `max_numel` elements of `dtype` take the
    symmetric-memory path (symmetric_all_reduce.py); the others, and every all-reduce elsewhere, use the group."""
    if _state.world_size > 1 and device.type == "cuda":
        _state.device_all_reduce = try_symmetric_all_reduce(max_numel, dtype, device, _state.world_size)


def get_host_group() -> dist.ProcessGroup:
    """The group's gloo side: host tensors broadcast through it without touching any GPU."""
    return _state.host_group


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks, in place."""
    if _state.world_size == 1:
        return tensor
    reducer = _state.device_all_reduce
    if reducer is not None and reducer.can_reduce(tensor):
        return reducer(tensor)
    dist.all_reduce(tensor)
    return tensor


def broadcast_from_first_rank(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's `tensor`, on every rank (in place)."""
    if _state.world_size > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's `tensor`, concatenated along `dim` in rank order."""
    if _state.world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(_state.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim)


def shard_range(size: int, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(start, length) of this rank's share of `size`: equal shares, the first `size % world_size` ranks
    holding one more (so 9 heads over 2 ranks are 5 + 4, not an error)."""
    rank = _state.rank if rank is None else rank
    world_size = _state.world_size if world_size is None else world_size
    base, extra = divmod(size, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)
