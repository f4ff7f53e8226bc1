"""Prefill attention over the paged KV cache: several new tokens per sequence, after whatever context the
cache already holds for it (a prefix-cache hit, or earlier chunks of a chunked prefill).

Grid: (query tiles, query heads). The flat batch is cut into tiles of BLOCK_M new tokens that never straddle
two sequences; sequence i's tiles are numbered from query_start_loc[i] // BLOCK_M + i, so a program finds its
sequence by binary search over query_start_loc. A program attends its tile causally to the sequence's whole
context, block by block, with an online softmax. Single-token (decode) sequences are left to paged_decode.
"""
import torch
import triton
import triton.language as tl

from wde.core.kernels.paged_kv import (cache_scale, dot_precision, head_pad, load_kv_tile, online_softmax_step,
                                      over_dims, soft_capped, unit_kv_scales)

LOG2E = 1.4426950408889634


@triton.jit
def _find_sequence(query_start_ptr, num_seqs, tile, BLOCK_M: tl.constexpr):
    low = 0
    high = num_seqs
    while low < high:
        mid = (low + high) // 2
        if tl.load(query_start_ptr + mid) // BLOCK_M + mid <= tile:
            low = mid + 1
        else:
            high = mid
    return low - 1


# the batch's sequence count and block-table width change every step: not specialized on, so one compile serves
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, num_seqs,
                    scales_ptr, scales_kv_stride, stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ct, stride_ch, stride_bt,
                    scale_log2, window, softcap_log2, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = _find_sequence(query_start_ptr, num_seqs, tile, BLOCK_M)
    query_start = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - query_start
    first = (tile - (query_start // BLOCK_M + seq)) * BLOCK_M  # this tile's first new token in the sequence
    if query_len < 2 or first >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len
    kv_head = head // GROUP

    new_tokens = first + tl.arange(0, BLOCK_M)
    row_mask = new_tokens < query_len
    positions_q = context_len + new_tokens
    dims = tl.arange(0, HEAD_PAD)
    rows_over_dims = over_dims(row_mask, dims, HEAD_DIM, HEAD_PAD)
    q = tl.load(q_ptr + (query_start + new_tokens)[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=rows_over_dims, other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    scale_log2 *= cache_scale(scales_ptr, kv_head, k_ptr)  # a float8 cache's K / scale: the scale joins the score's
    end = tl.minimum(context_len + first + BLOCK_M, seq_len)  # the last key any row of this tile may see
    # the first key any row may see: with a sliding window (window > 0), the first row's window
    begin = tl.where(window > 0, tl.maximum(context_len + first - window + 1, 0) // BLOCK_N * BLOCK_N, 0)
    for n_start in range(begin, end, BLOCK_N):
        positions = n_start + tl.arange(0, BLOCK_N)
        valid = positions < end
        k, v = load_kv_tile(k_ptr, v_ptr, block_tables_ptr, seq, positions, valid, kv_head, dims,
                            stride_bt, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, HEAD_DIM, HEAD_PAD)
        k, v = k.to(q.dtype), v.to(q.dtype)  # a float8 cache's values widened (else: as they are)
        scores = soft_capped(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2, softcap_log2, SOFTCAP)
        visible = valid[None, :] & (positions[None, :] <= positions_q[:, None])
        visible = visible & ((positions[None, :] > positions_q[:, None] - window) | (window <= 0))
        scores = tl.where(visible, scores, float("-inf"))
        m, l, acc = online_softmax_step(scores, v, m, l, acc, PRECISION)
    acc *= cache_scale(scales_ptr + scales_kv_stride, kv_head, k_ptr)  # and V's scale the weighted sum's
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + (query_start + new_tokens)[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rows_over_dims)


def paged_prefill(q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                  block_m: int = 64, block_n: int = 64, window: int | None = None, softcap: float | None = None,
                  kv_scales: torch.Tensor | None = None) -> None:
    """q, out: [tokens, heads, head_dim]; kv_cache: [2, blocks, block_size, kv_heads, head_dim]; window,
    softcap and kv_scales as in paged_decode."""
    num_seqs = seq_lens.shape[0]
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    num_tiles = q.shape[0] // block_m + num_seqs
    kv_scales = unit_kv_scales(kv_cache) if kv_scales is None else kv_scales
    _prefill_kernel[(num_tiles, q.shape[1])](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, num_seqs, kv_scales, kv_scales.stride(0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        scale * LOG2E, window or 0, (softcap or 1.0) * LOG2E, GROUP=q.shape[1] // num_kv_heads, HEAD_DIM=head_dim,
        HEAD_PAD=head_pad(head_dim), BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        SOFTCAP=softcap is not None,
        PRECISION=dot_precision(q.dtype), num_warps=4)
