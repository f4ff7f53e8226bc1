"""The experts of a mixture-of-experts layer as grouped matmuls: every token's k (expert, weight) choices sorted
by expert into blocks of BLOCK_M rows, and one program per (block, tile of output columns) multiplying its rows
by that block's expert.

A block holds rows of one expert only (each expert's rows are padded up to a multiple of BLOCK_M), so a program
streams one expert's weight tile, and an expert chosen by at most BLOCK_M rows has its weights read once per
step: in a decode step of a few hundred tokens most experts are. The sort is made of torch ops of fixed sizes
(no count comes back to the host), so a step with MoE layers can be captured in a CUDA graph: the grid covers
the most blocks the sort can produce, and the programs past the used blocks return at once.

A second path (block_m = 1 in the tiles), for steps of a token or two where tune_moe.py finds it faster: no
sort, one program per (token, choice) pair and tile of output columns, each streaming its expert's rows as a
matrix-vector product on the CUDA cores. At batch 1 the grouped matmul gives each of the 8 chosen experts one
padded block, too few programs to stream its weights (23% of the H200's bandwidth over Qwen3-30B-A3B's
experts), and the sort costs a dozen small kernels a layer.
"""
import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import triton
import triton.language as tl

from wde.core.kernels.activation import silu_and_mul


@dataclass(frozen=True)
class ExpertBlocks:
    """Rows of (token, choice) pairs grouped by expert. Row r of the sorted order is flat pair
    sorted_pairs[r] (token sorted_pairs[r] // top_k); pairs == num_pairs mark padding. Block b holds rows
    b*block_m..(b+1)*block_m of expert block_expert[b]; num_experts marks a block past the used ones."""
    sorted_pairs: torch.Tensor  # [max_rows] int32
    block_expert: torch.Tensor  # [max_rows // block_m] int32
    block_m: int
    num_pairs: int


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """topk_ids: [tokens, top_k] expert ids -> the rows grouped by expert, each group padded to block_m."""
    pairs = topk_ids.numel()
    flat = topk_ids.reshape(-1).to(torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert_of_row = flat[order]
    rank_in_expert = torch.arange(pairs, device=flat.device) - (counts.cumsum(0) - counts)[expert_of_row]
    max_rows = triton.cdiv(pairs + num_experts * (block_m - 1), block_m) * block_m
    sorted_pairs = torch.full((max_rows,), pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs[(padded_end - padded)[expert_of_row] + rank_in_expert] = order.to(torch.int32)
    block_starts = torch.arange(0, max_rows, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)  # E past the end
    return ExpertBlocks(sorted_pairs, block_expert, block_m, pairs)


@triton.jit
def _grouped_matmul_kernel(a_ptr, w_ptr, out_ptr, pair_weight_ptr, sorted_pairs_ptr, block_expert_ptr,
                           num_pairs, N, K, stride_am, stride_we, stride_wn, stride_om, num_experts,
                           A_ROWS_PER_TOKEN: tl.constexpr, TOP_K: tl.constexpr, WEIGHTED: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= num_experts:
        return
    pairs = tl.load(sorted_pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = pairs < num_pairs
    # the gate/up matmul reads the token's hidden state (one row per token), the down matmul its pair's row
    a_rows = pairs // TOP_K if A_ROWS_PER_TOKEN else pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + a_rows[:, None].to(tl.int64) * stride_am + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(w), acc)
    if WEIGHTED:
        acc *= tl.load(pair_weight_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + pairs[:, None].to(tl.int64) * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _pair_matmul_kernel(a_ptr, w_ptr, out_ptr, pair_weight_ptr, ids_ptr, N, K, stride_am, stride_we, stride_wn,
                        stride_om, num_experts, A_ROWS_PER_TOKEN: tl.constexpr, TOP_K: tl.constexpr,
                        WEIGHTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pair = tl.program_id(0)
    expert = tl.load(ids_ptr + pair)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    if expert < num_experts:  # else another rank's expert (expert parallelism): this pair's row stays zero
        a_row = pair // TOP_K if A_ROWS_PER_TOKEN else pair
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        for k_start in range(0, K, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            a = tl.load(a_ptr + a_row.to(tl.int64) * stride_am + ks, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_base + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * a[None, :], axis=1)
        if WEIGHTED:
            acc *= tl.load(pair_weight_ptr + pair).to(tl.float32)
    tl.store(out_ptr + pair.to(tl.int64) * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


@dataclass(frozen=True)
class MatmulTiles:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def grouped_matmul(a: torch.Tensor, weight: torch.Tensor, blocks: ExpertBlocks, top_k: int, tiles: MatmulTiles,
                   pair_weights: torch.Tensor | None = None, a_rows_per_token: bool = True,
                   zeroed: bool = False) -> torch.Tensor:
    """Row p of the result [num_pairs, N] = a[row of p] @ weight[expert of p]^T (times pair_weights[p]).

    a: [tokens, K] (a_rows_per_token) or [num_pairs, K], unit stride along K; weight: [experts, N, K]
    contiguous; pair_weights: [num_pairs] routing weights, or None. Rows of pairs whose expert is not in
    `weight` (expert parallelism: another rank's) are left as they are: zeros when `zeroed`.
    """
    num_experts, n, k = weight.shape
    assert a.stride(-1) == 1 and weight.is_contiguous(), "the rows of `a` and all of `weight` must be contiguous"
    out = (torch.zeros if zeroed else torch.empty)(blocks.num_pairs, n, dtype=a.dtype, device=a.device)
    grid = (blocks.block_expert.numel(), triton.cdiv(n, tiles.block_n))
    _grouped_matmul_kernel[grid](
        a, weight, out, pair_weights if pair_weights is not None else out, blocks.sorted_pairs, blocks.block_expert,
        blocks.num_pairs, n, k, a.stride(0), weight.stride(0), weight.stride(1), out.stride(0), num_experts,
        A_ROWS_PER_TOKEN=a_rows_per_token, TOP_K=top_k, WEIGHTED=pair_weights is not None,
        BLOCK_M=blocks.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages)
    return out


def pair_matmul(a: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, top_k: int, tiles: MatmulTiles,
                pair_weights: torch.Tensor | None = None, a_rows_per_token: bool = True) -> torch.Tensor:
    """grouped_matmul's result without the sort: ids [num_pairs] int32, each pair's expert (past the experts of
    `weight`: another rank's, whose row is zeros)."""
    num_experts, n, k = weight.shape
    assert a.stride(-1) == 1 and weight.is_contiguous(), "the rows of `a` and all of `weight` must be contiguous"
    out = torch.empty(ids.numel(), n, dtype=a.dtype, device=a.device)
    grid = (ids.numel(), triton.cdiv(n, tiles.block_n))
    _pair_matmul_kernel[grid](
        a, weight, out, pair_weights if pair_weights is not None else out, ids, n, k, a.stride(0),
        weight.stride(0), weight.stride(1), out.stride(0), num_experts, A_ROWS_PER_TOKEN=a_rows_per_token,
        TOP_K=top_k, WEIGHTED=pair_weights is not None, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out


# tiles measured best on a device for a layer shape and a number of tokens (benchmarks/tune_moe.py writes it):
# {device name: {"experts x hidden x intermediate / top_k": {tokens: [block_m, block_n, block_k, warps, stages]}}}
TUNED_TILES = Path(__file__).with_name("fused_moe_tiles.json")


def default_tiles(num_pairs: int, num_experts: int) -> tuple[int, MatmulTiles]:
    """(block_m, tiles) for shapes not tuned: block_m about the rows an expert gets, so decode steps of few tokens
    pad little (tensor-core tiles need >= 16 rows) and long prefills reuse each weight tile over more rows. The
    path without the sort is taken only where benchmarks/tune_moe.py measured it faster."""
    rows_per_expert = num_pairs / num_experts
    block_m = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 64 else 64
    return block_m, MatmulTiles(block_n=64, block_k=128 if block_m <= 16 else 64, num_warps=4, num_stages=3)


def layer_key(num_experts: int, hidden: int, intermediate: int, top_k: int) -> str:
    return f"{num_experts}x{hidden}x{intermediate}/{top_k}"


@cache
def tuned_tables(device_name: str) -> dict[str, dict[str, list[int]]]:
    tables = json.loads(TUNED_TILES.read_text()) if TUNED_TILES.exists() else {}
    return tables.get(device_name, {})


def choose_tiles(w13: torch.Tensor, tokens: int, top_k: int) -> tuple[int, MatmulTiles]:
    """The tuned tiles of this device and layer shape for the nearest number of tokens tuned (by ratio), else
    default_tiles. The path without the sort only as far as the tuning tries it (at most a pair an expert):
    past that it reads an expert's weights once per pair."""
    num_experts, two_intermediate, hidden = w13.shape
    name = torch.cuda.get_device_name(w13.device) if w13.is_cuda else "cpu"
    table = tuned_tables(name).get(layer_key(num_experts, hidden, two_intermediate // 2, top_k), {})
    if tokens * top_k > num_experts:
        table = {tuned: tiles for tuned, tiles in table.items() if tiles[0] != 1}
    if not table:
        return default_tiles(tokens * top_k, num_experts)
    nearest = min(table, key=lambda tuned: abs(math.log(int(tuned) / max(tokens, 1))))
    block_m, *tiles = table[nearest]
    return block_m, MatmulTiles(*tiles)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor, remote_choices: bool = False,
                  tiles: tuple[int, MatmulTiles] | None = None) -> torch.Tensor:
    """layers/moe.py's experts_reference as two grouped matmuls: [tokens, hidden] -> [tokens, hidden]. With
    `remote_choices`, ids equal to the number of experts here are another rank's: sorted into a group of their
    own after the last expert, which no program computes, and their rows of the down matmul stay zero. `tiles`:
    (block_m, MatmulTiles) for both matmuls, block_m = 1 for the path without the sort; default: choose_tiles."""
    tokens, top_k = ids.shape
    if tokens == 0:
        return x.new_zeros(0, w2.shape[1])
    num_experts = w13.shape[0]
    block_m, tiles = tiles or choose_tiles(w13, tokens, top_k)
    if block_m == 1:
        flat_ids = ids.reshape(-1).to(torch.int32)
        hidden = silu_and_mul(pair_matmul(x, w13, flat_ids, top_k, tiles))
        pair_out = pair_matmul(hidden, w2, flat_ids, top_k, tiles, pair_weights=weights.reshape(-1),
                               a_rows_per_token=False)
    else:
        blocks = sort_by_expert(ids, num_experts + remote_choices, block_m)
        hidden = silu_and_mul(grouped_matmul(x, w13, blocks, top_k, tiles))
        pair_out = grouped_matmul(hidden, w2, blocks, top_k, tiles, pair_weights=weights.reshape(-1),
                                  a_rows_per_token=False, zeroed=remote_choices)
    return pair_out.view(tokens, top_k, -1).sum(1)
