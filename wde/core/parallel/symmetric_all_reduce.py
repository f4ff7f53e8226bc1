"""All-reduce through PyTorch's symmetric memory, for GPUs of one host that read each other's memory (NVLink).

Why not NCCL alone: a decode step of a 7B model at TP=2 all-reduces 57 tensors of ~2 MB. On two H200s NCCL took
~44 us for each inside a CUDA graph (~27 us eagerly) where the two-shot kernel of torch.ops.symm_mem takes
~12 us, and 8192-token prefill tensors (~59 MB) 243 us against 186 us (benchmarks/results, 2026-11-21). Each
rank copies its tensor into a buffer every rank can read, the kernel sums its share from all buffers and
gathers the rest, and the sum is copied back. Tensors larger than the buffer, or of another dtype, go to NCCL.
"""
import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

ALIGNMENT_BYTES = 16  # the kernel moves 16-byte vectors


class SymmetricAllReduce:
    def __init__(self, max_numel: int, dtype: torch.dtype, device: torch.device):
        from torch.distributed import _symmetric_memory as symm_mem
        self.group_name = dist.group.WORLD.group_name
        self.buffer = symm_mem.empty(max_numel, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def can_reduce(self, tensor: torch.Tensor) -> bool:
        return (tensor.dtype == self.buffer.dtype and tensor.numel() <= self.buffer.numel()
                and tensor.numel() * tensor.element_size() % ALIGNMENT_BYTES == 0)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums `tensor` over the ranks, in place."""
        staged = self.buffer[:tensor.numel()]
        staged.copy_(tensor.reshape(-1))
        torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self.group_name)
        tensor.copy_(staged.view(tensor.shape))
        return tensor


def peers_reachable(world_size: int) -> bool:
    """Every rank on this host (spawned, or torchrun with one node) and every pair of GPUs peer-accessible."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) != world_size:
        return False
    return all(torch.cuda.can_device_access_peer(a, b)
               for a in range(world_size) for b in range(world_size) if a != b)


def try_symmetric_all_reduce(max_numel: int, dtype: torch.dtype, device: torch.device,
                             world_size: int) -> SymmetricAllReduce | None:
    """The symmetric-memory all-reduce when every rank could set it up, else None (all ranks agree: a rank
    using it while another used NCCL would wait forever)."""
    reducer, reason = None, "GPUs cannot reach each other's memory"
    if peers_reachable(world_size):
        try:
            reducer = SymmetricAllReduce(max_numel, dtype, device)
        except (RuntimeError, AttributeError, ImportError) as e:  # an older torch, or no symmetric memory here
            reason = f"{type(e).__name__}: {e}"
    ready = torch.tensor([reducer is not None], dtype=torch.int32, device=device)
    dist.all_reduce(ready, op=dist.ReduceOp.MIN)
    if not bool(ready.item()):
        if reducer is not None:
            reason = "another rank could not set it up"
        logger.info("all-reduce: NCCL (symmetric memory unavailable: %s)", reason)
        return None
    logger.info("all-reduce: symmetric memory (two-shot) up to %d elements of %s, NCCL above", max_numel, dtype)
    return reducer
