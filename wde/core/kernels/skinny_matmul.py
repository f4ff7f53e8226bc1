"""y = x W^T (+ b) for a few rows of x (decode steps of small batches): a weight-streaming matmul.

With 16 rows or fewer a matmul is a read of the weight: its time is the weight's bytes over the memory
bandwidth. Each program streams BLOCK_N rows of W (contiguous along K, so every load is coalesced) through
one [16, BLOCK_K] x [BLOCK_K, BLOCK_N] tensor-core product per tile, the rows of x beyond M masked to zero,
and accumulates in float32. BLOCK_N is chosen so the grid covers the GPU about once; the loads are
software-pipelined (num_stages) to keep enough bytes in flight per SM.

An FP8 weight (quantization="fp8", wde/core/layers/fp8.py) streams at one byte a value: each tile is widened
to x's dtype (exact: bf16 and fp16 hold every float8 e4m3 value) and the float32 sums are multiplied by the
weight's per-row scale. x stays unquantized, so at these batch sizes no per-token quantization runs at all.
"""
import torch
import triton
import triton.language as tl

MAX_ROWS = 16


@triton.jit(do_not_specialize=["M"])  # one compile for every row count
def _skinny_matmul_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                          SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    rows = tl.arange(0, 16)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    if SCALED:
        acc *= tl.load(scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def block_n_for(n: int, num_sms: int) -> int:
    """The widest tile of output columns that still gives every SM a program."""
    for block_n in (128, 64, 32):
        if triton.cdiv(n, block_n) >= num_sms:
            return block_n
    return 16


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_sms: int,
                  weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M <= 16, K] with unit stride along K; weight: [N, K] contiguous, of x's dtype or float8 with its
    float32 scales [N, 1] in `weight_scale`; bias: [N] or None -> [M, N]."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_ROWS and x.stride(1) == 1 and weight.is_contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n = block_n_for(n, num_sms)
    _skinny_matmul_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight_scale if weight_scale is not None else weight, bias if bias is not None else weight, out,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0), SCALED=weight_scale is not None,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=128 if block_n >= 64 else 256, num_warps=4,
        num_stages=4)
    return out
