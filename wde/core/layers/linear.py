"""Linear layers split for tensor parallelism, whose parameters load their own rank's share of a checkpoint.

With one rank they are plain linear layers. Column-parallel layers split the outputs (each rank computes a
slice); row-parallel layers split the inputs and add the ranks' partial sums (all-reduce). The q/k/v layer
splits by KV head, each rank taking its KV heads' groups of q heads (shares may differ by one head); when there
are fewer KV heads than ranks, the ranks that share a KV head each hold a copy of it. A checkpoint tensor may
arrive lazily (a safetensors slice): `narrow` reads only the rows a rank keeps.
"""
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from wde.core.layers.fp8 import fp8_matmul
from wde.core.parallel.distributed import all_reduce, get_tp_rank, get_tp_size, shard_range

if torch.cuda.is_available():  # Triton comes with CUDA builds of torch
    from wde.core.kernels.skinny_matmul import MAX_ROWS, skinny_matmul


@cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b), through the faster of wde's skinny matmul and the library's for this shape (see
    skinny_is_faster). `weight_scale`: the float8 weight's scales, else None."""
    if (x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.dtype in (torch.float16, torch.bfloat16)
            and x.stride(1) == 1 and weight.is_contiguous() and skinny_is_faster(x, weight, bias, weight_scale)):
        return skinny_matmul(x, weight, bias, _num_sms(x.device), weight_scale)
    return library_matmul(x, weight, bias, weight_scale)


def library_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   weight_scale: torch.Tensor | None) -> torch.Tensor:
    """cuBLAS, or for a float8 weight with its scales, fp8_matmul (scaled matmul of x quantized per token)."""
    if weight_scale is not None:
        return fp8_matmul(x, weight, weight_scale, bias)
    return F.linear(x, weight, bias)


_SKINNY_FASTER: dict[tuple, bool] = {}


def skinny_is_faster(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     weight_scale: torch.Tensor | None) -> bool:
    """Whether the skinny matmul beats the library's at this (rows, N, K, dtypes), measured the first time the
    shape runs outside a CUDA graph (a decode graph's warm-up pass runs each shape before its capture): neither
    wins everywhere (on an H200, cuBLAS takes 12 us for Qwen3-0.6B's o_proj at one row, the skinny matmul 5;
    cuBLAS is ahead on most others; benchmarks/kernels.py). A shape first seen inside a capture takes the
    library's."""
    key = (x.shape[0], *weight.shape, x.dtype, weight.dtype, bias is not None, x.device)
    if key not in _SKINNY_FASTER:
        if torch.cuda.is_current_stream_capturing():
            return False
        skinny = time_in_graph(lambda: skinny_matmul(x, weight, bias, _num_sms(x.device), weight_scale))
        _SKINNY_FASTER[key] = skinny < time_in_graph(lambda: library_matmul(x, weight, bias, weight_scale))
    return _SKINNY_FASTER[key]


def time_in_graph(fn, calls: int = 20, replays: int = 3) -> float:
    """GPU seconds per call of `fn`, replayed from a CUDA graph of `calls` calls (as a decode step runs them: no
    host launch cost in the figure)."""
    fn()  # compiles, picks its kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / (calls * replays)


def materialize(loaded) -> torch.Tensor:
    """A checkpoint tensor, read now if it was handed over lazily."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def narrow(loaded, dim: int, start: int, length: int, full: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) start:start+length of a checkpoint tensor, reading no more than those;
    ValueError unless the tensor has `full` of them (the model's size, of which this rank keeps a slice: a
    tensor too large would otherwise load cut to size, and one too small fail as an out-of-range slice)."""
    shape = tuple(loaded.shape if isinstance(loaded, torch.Tensor) else loaded.get_shape())
    if len(shape) <= dim or shape[dim] != full:
        raise ValueError(f"checkpoint tensor has shape {shape}, the model takes {full} along dimension {dim}")
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, length)
    return loaded[start:start + length] if dim == 0 else loaded[:, start:start + length]


def default_weight_loader(param: nn.Parameter, loaded) -> None:
    loaded = materialize(loaded)
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, the parameter {tuple(param.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    """y = x W^T (+ b), whole on every rank. Parameters start uninitialized: the loader fills every one.
    `weight_scale` is set when the weight is FP8 (wde/core/layers/fp8.py), else None."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None
        self.register_parameter("weight_scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(x, self.weight, bias, self.weight_scale)


class MergedColumnParallelLinear(Linear):
    """Several projections of one input in one matmul (gate/up, q/k/v), each split by output over the ranks.

    `output_sizes` are the full (unsplit) sizes of the parts; checkpoints store the parts as separate tensors and
    each loads, as its shard id, into its own rows.
    """

    def __init__(self, input_size: int, output_sizes: dict[str, int], bias: bool = False):
        self.output_sizes = output_sizes
        self.shards = {name: self.shard_of(name, size) for name, size in output_sizes.items()}
        super().__init__(input_size, sum(length for _, length in self.shards.values()), bias)
        for param in self.parameters():
            param.shard_ids = tuple(output_sizes)
            param.weight_loader = self._load_shard

    def shard_of(self, name: str, size: int) -> tuple[int, int]:
        """(first row in the checkpoint tensor, rows) of part `name` that this rank holds."""
        return shard_range(size)

    def _load_shard(self, param: nn.Parameter, loaded, shard_id: str) -> None:
        if shard_id not in self.shards:
            raise KeyError(f"no shard {shard_id!r} in {list(self.shards)}")
        offset = 0
        for name, (start, length) in self.shards.items():
            if name == shard_id:
                default_weight_loader(param.data.narrow(0, offset, length),
                                      narrow(loaded, 0, start, length, self.output_sizes[name]))
                return
            offset += length


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections, split by KV head (see the module docstring)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        self.head_dim = head_dim
        self.q_heads, self.kv_heads = heads_of_rank(num_heads, num_kv_heads)
        super().__init__(hidden_size, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                                       "v": num_kv_heads * head_dim}, bias)

    def shard_of(self, name: str, size: int) -> tuple[int, int]:
        first_head, count = self.q_heads if name == "q" else self.kv_heads
        return first_head * self.head_dim, count * self.head_dim


def heads_of_rank(num_heads: int, num_kv_heads: int, rank: int | None = None, world_size: int | None = None
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((first q head, count), (first KV head, count)) this rank holds."""
    rank = get_tp_rank() if rank is None else rank
    world_size = get_tp_size() if world_size is None else world_size
    group = num_heads // num_kv_heads
    if num_kv_heads >= world_size:  # whole KV groups per rank
        first_kv, kv_count = shard_range(num_kv_heads, rank, world_size)
        return (first_kv * group, kv_count * group), (first_kv, kv_count)
    # fewer KV heads than ranks: the ranks sharing a KV head split its group of q heads, each with a copy of it
    ranks_per_kv = world_size // num_kv_heads
    first_q, q_count = shard_range(num_heads, rank, world_size)
    return (first_q, q_count), (rank // ranks_per_kv, 1)


def check_tensor_parallel_shapes(num_heads: int, num_kv_heads: int, world_size: int) -> None:
    """Refuse a head layout that cannot be split over `world_size` ranks, saying why."""
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} attention heads do not group evenly over {num_kv_heads} KV heads")
    if num_kv_heads >= world_size:
        return
    if world_size % num_kv_heads or num_heads % world_size:
        raise ValueError(f"tensor_parallel_size={world_size} cannot split {num_heads} heads over {num_kv_heads} KV "
                         f"heads: with fewer KV heads than ranks, the ranks must divide the KV heads' q heads evenly "
                         f"(use a size that divides {num_heads} and is a multiple of {num_kv_heads})")


class RowParallelLinear(Linear):
    """Split by input: each rank multiplies its slice of x (the output of a column-parallel layer), and the
    ranks' partial results are summed; the bias is added once, after the sum.

    `input_shard` is the (start, length) of this rank's input columns; by default an even share.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 input_shard: tuple[int, int] | None = None):
        self.input_size, self.input_shard = input_size, input_shard or shard_range(input_size)
        super().__init__(self.input_shard[1], output_size, bias)
        self.weight.weight_loader = self._load_weight

    def _load_weight(self, param: nn.Parameter, loaded) -> None:
        default_weight_loader(param, narrow(loaded, 1, *self.input_shard, self.input_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = all_reduce(self.matmul(x, None))
        return out + self.bias if self.bias is not None else out
