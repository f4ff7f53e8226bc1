"""Per-token FP8 quantization of activations in one kernel: each row of x divided by its amax / 448, rounded
to float8 e4m3, with its float32 scale.

Why a kernel: torch computes the same numbers (wde/core/layers/fp8.py quantize_rows) in five passes over x (abs,
amax, divide, clamp, cast) before every FP8 matmul; one program per row reads it twice (amax, then the cast,
the second read mostly from cache) and writes one byte a value.
"""
import torch
import triton
import triton.language as tl

from wde.core.kernels.paged_kv import cast_for


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, K, stride_xm, FP8_MAX: tl.constexpr,
                          MIN_SCALE: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_xm + k + cols, mask=k + cols < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    scale = tl.maximum(tl.max(amax, 0) / FP8_MAX, MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    for k in range(0, K, BLOCK_K):
        mask = k + cols < K
        x = tl.load(x_ptr + row * stride_xm + k + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * K + k + cols, cast_for(x.to(tl.float32) / scale, out_ptr), mask=mask)


def quantize_rows_fused(x: torch.Tensor, fp8_max: float, min_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, K] (unit stride along K) -> (float8 [rows, K], float32 scales [rows, 1])."""
    rows, k = x.shape
    out = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        _quantize_rows_kernel[(rows,)](x, out, scale, k, x.stride(0), FP8_MAX=fp8_max, MIN_SCALE=min_scale,
                                       BLOCK_K=min(triton.next_power_of_2(k), 2048), num_warps=4)
    return out, scale
