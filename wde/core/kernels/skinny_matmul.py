"""y = x W^T (+ b) for a few rows of x (decode steps of small batches): a weight-streaming matmul.

With 16 rows or fewer a matmul is a read of the weight: its time is the weight's bytes over the memory
bandwidth. Each program streams BLOCK_N rows of W (contiguous along K, so every load is coalesced) through
one [16, BLOCK_K] x [BLOCK_K, BLOCK_N] tensor-core product per tile, the rows of x beyond M masked to zero,
and accumulates in float32. BLOCK_N is chosen so the grid covers the GPU about once; the loads are
software-pipelined (num_stages) to keep enough bytes in flight per SM.

An FP8 weight (quantization="fp8", wde/core/layers/fp8.py) streams at one byte a value: each tile is widened
to x's dtype (exact: bf16 and fp16 hold every float8 e4m3 value) and the float32 sums are multiplied by the
weight's per-row scale. x stays unquantized, so at these batch sizes no per-token quantization runs at all.
Where widening to bf16 is the bottleneck (the widest tiles), the weight widens to fp16 instead (one hardware
conversion on Hopper) and x is taken to fp16 too, divided by 2^8 so that values up to 1.6e7 fit (below 2^-6
fp16 keeps an absolute precision of 2^-16, finer than bf16's relative one there); the scale undoes the 2^8.

A weight too narrow to give every SM a wide tile (a float8 weight streams its tile in half the time, so it
needs twice the programs in flight) splits K over SPLIT_K programs per column tile: each writes its float32
partial sums to a workspace and counts itself done on the tile's counter; the last to finish adds the partials
in split order (the same sums on every run), scales, adds the bias and writes the output, and zeroes the counter
for the next launch. One counter buffer per device serves every launch: launches on a stream run in order, and
each leaves it zeroed (a CUDA graph replays with it too).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 16
X_SHIFT = tl.constexpr(2.0 ** -8)  # x into fp16's range for FP16_PRODUCTS


@dataclass(frozen=True)
class SkinnyTile:
    block_n: int  # output columns per program
    block_k: int  # depth of each step along K
    num_stages: int = 3  # loads in flight (software pipelining)
    fp16_products: bool = False  # float8 weights only: widened to fp16, x taken to fp16 (module docstring)
    split_k: int = 1  # programs per column tile, each over its part of K (module docstring)


@triton.jit
def _finish(acc, scale_ptr, bias_ptr, out_ptr, rows, cols, row_mask, col_mask, stride_om, SCALED: tl.constexpr,
            HAS_BIAS: tl.constexpr, FP16_PRODUCTS: tl.constexpr):
    """The float32 sums of a [16, BLOCK_N] tile scaled (a float8 weight), biased and written as the output."""
    if SCALED:
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
        if FP16_PRODUCTS:
            scale = scale / X_SHIFT
        acc *= scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit(do_not_specialize=["M"])  # one compile for every row count
def _skinny_matmul_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, partial_ptr, counters_ptr, M, N, K,
                          stride_xm, stride_wn, stride_om, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP16_PRODUCTS: tl.constexpr,
                          SPLIT_K: tl.constexpr):
    tile, split = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, 16)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_end = tl.minimum(K, (split + 1) * per_split)
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    for k_start in range(split * per_split, k_end, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_mask = ks < k_end
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if FP16_PRODUCTS:
            x = tl.clamp(x.to(tl.float32) * X_SHIFT, -65504.0, 65504.0).to(tl.float16)
            acc = tl.dot(x, tl.trans(w.to(tl.float16)), acc)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    if SPLIT_K == 1:
        _finish(acc, scale_ptr, bias_ptr, out_ptr, rows, cols, row_mask, col_mask, stride_om, SCALED, HAS_BIAS,
                FP16_PRODUCTS)
    else:
        local = rows[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # [16, BLOCK_N] within one partial
        partials = partial_ptr + tile * SPLIT_K * 16 * BLOCK_N
        tl.store(partials + split * 16 * BLOCK_N + local, acc)
        # acq_rel: this split's partial is visible to whoever counts last, and that one sees all the others'
        if tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            tl.store(counters_ptr + tile, 0)  # ready for the next launch
            total = tl.zeros([16, BLOCK_N], tl.float32)
            for other in range(0, SPLIT_K):  # .cg: past this SM's L1, which may not hold the others' writes
                total += tl.load(partials + other * 16 * BLOCK_N + local, cache_modifier=".cg")
            _finish(total, scale_ptr, bias_ptr, out_ptr, rows, cols, row_mask, col_mask, stride_om, SCALED,
                    HAS_BIAS, FP16_PRODUCTS)


def block_n_for(n: int, num_sms: int) -> int:
    """The widest tile of output columns that still gives every SM a program."""
    for block_n in (128, 64, 32):
        if triton.cdiv(n, block_n) >= num_sms:
            return block_n
    return 16


def tile_for(n: int, k: int, num_sms: int, float8_weight: bool) -> SkinnyTile:
    """The fastest tile measured at one row (benchmarks/kernels.py --sweep): a weight wide enough to give every
    SM a tile of 128 columns takes it unsplit (bf16 128 deep; float8 widened to fp16, 128 deep, 4 stages: H200,
    kernels-nvidia-h200-20261204T175919.json); a narrower one splits K (split_tile). Without a split, bf16 takes
    narrow tiles over a long K 512 deep (Llama-3.1-8B's down_proj at one row 36 us on an H200, 43 at 128 deep)
    and float8 256."""
    block_n = block_n_for(n, num_sms)
    if block_n == 128:
        return SkinnyTile(128, 128, 4, fp16_products=True) if float8_weight else SkinnyTile(128, 128)
    split = split_tile(n, k, num_sms, float8_weight)
    if split is not None:
        return split
    if float8_weight:
        return SkinnyTile(block_n, 256)
    return SkinnyTile(block_n, 512 if block_n <= 32 and k >= 2048 else 128)


def split_tile(n: int, k: int, num_sms: int, float8_weight: bool) -> SkinnyTile | None:
    """The fewest splits of K that give about every SM a program, or None where no split pays. Measured on an
    H100 at one row (kernels-nvidia-h100-80gb-hbm3-20261206T083230.json): float8 Llama-3.1-8B's down_proj 25 us
    in 128-column tiles over 4 splits against 47 unsplit, its o_proj 8.2 against 14.9, Qwen3-0.6B's o_proj in
    32-column tiles 4.2 against 6.5; bf16 Qwen3-0.6B's o_proj 3.8 against 5.5. A float8 tile of 128 columns
    needs 1,024 of K per split to pay, one of 32 columns 256. bf16 splits only narrow weights of a K between
    2,048 and 8,192: over a longer one (Llama-3.1-8B's down_proj, 14,336) each program already keeps enough loads
    in flight, and a shorter one (Qwen3-0.6B's qkv_proj, 1,024) loses more to adding the partials than it gains.
    """
    if float8_weight:
        for block_n, min_depth in ((128, 1024), (32, 256)):
            for split in (1, 2, 4, 8):
                if k // split < min_depth:
                    break
                if triton.cdiv(n, block_n) * split >= 0.9 * num_sms:
                    return SkinnyTile(block_n, 256, 3, fp16_products=block_n == 128 or split > 1, split_k=split)
        return None
    if triton.cdiv(n, 32) >= num_sms or not 2048 <= k < 8192:
        return None
    for split in (2, 4, 8):
        if triton.cdiv(n, 32) * split >= 0.9 * num_sms and k // split >= 128:
            return SkinnyTile(32, 128, 3, split_k=split)
    return None


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_sms: int,
                  weight_scale: torch.Tensor | None = None, tile: SkinnyTile | None = None) -> torch.Tensor:
    """x: [M <= 16, K] with unit stride along K; weight: [N, K] contiguous, of x's dtype or float8 with its
    float32 scales [N, 1] in `weight_scale`; bias: [N] or None -> [M, N]. tile: tile_for's unless given."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_ROWS and x.stride(1) == 1 and weight.is_contiguous()
    tile = tile or tile_for(n, k, num_sms, weight_scale is not None)
    assert weight_scale is not None or not tile.fp16_products
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    num_tiles = triton.cdiv(n, tile.block_n)
    partials = counters = out  # unused placeholders when K is not split
    if tile.split_k > 1:
        partials = torch.empty(num_tiles, tile.split_k, MAX_ROWS, tile.block_n, dtype=torch.float32,
                               device=x.device)
        counters = split_counters(num_tiles, x.device)
    _skinny_matmul_kernel[(num_tiles, tile.split_k)](
        x, weight, weight_scale if weight_scale is not None else weight, bias if bias is not None else weight, out,
        partials, counters, m, n, k, x.stride(0), weight.stride(0), out.stride(0), SCALED=weight_scale is not None,
        HAS_BIAS=bias is not None, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, FP16_PRODUCTS=tile.fp16_products,
        SPLIT_K=tile.split_k, num_warps=4, num_stages=tile.num_stages)
    return out


# each device's counter buffers, the largest last; none is ever freed: a CUDA graph replays with the one it
# captured
_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def split_counters(num_tiles: int, device: torch.device) -> torch.Tensor:
    """Counters of finished splits for num_tiles column tiles: zeros, and zeros again after every launch."""
    buffers = _COUNTERS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < num_tiles:
        buffers.append(torch.zeros(max(num_tiles, 1024), dtype=torch.int32, device=device))
    return buffers[-1]
