"""Decode attention over the paged KV cache: one new token per sequence, its context split across programs.

Grid: (sequences, KV heads, splits). A program takes the query rows of every query head that shares one KV
head (GQA), so each K/V tile is read once for the whole group, and walks its share of the context with an
online softmax. Each sequence uses as many of the grid's splits as its own length asks for (one per
`min_per_split` tokens), so a grid sized for the longest sequence (a CUDA graph's is sized for max_model_len)
costs the short ones nothing but programs that return at once. With one split a program writes the output;
with several, each writes a partial result and its log-sum-exp, and the last of them to finish (an atomic
count per sequence and KV head) combines them: no second kernel. Splitting keeps the GPU busy when few
sequences have long contexts. Sequences whose step is not a single-token decode are skipped (the prefill
kernel takes them). How a program walks its context (tokens a tile, warps, stages) is a DecodeTile.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from wde.core.kernels.paged_kv import (cache_scale, dot_precision, head_pad, load_kv_tile, online_softmax_step,
                                      over_dims, soft_capped, unit_kv_scales)

LOG2E = 1.4426950408889634
Q_SHIFT = tl.constexpr(2.0 ** -8)  # bf16 queries into fp16's range, beside a float8 cache


@triton.jit
def _combine_splits(out_ptr, part_out_ptr, part_lse_ptr, part, heads, row_mask, dims, token, stride_ot, stride_oh,
                    splits, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
    """out = the partial results of `splits` splits, weighted by their share of the softmax (log-sum-exps)."""
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    mask = over_dims(row_mask, dims, HEAD_DIM, HEAD_PAD)
    for split in range(0, splits):
        # .cg: read past this SM's L1, which may not hold what the other programs wrote
        lse = tl.load(part_lse_ptr + part + split, mask=row_mask, other=float("-inf"), cache_modifier=".cg")
        values = tl.load(part_out_ptr + (part + split)[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0,
                         cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # all empty so far: no weight yet, not NaN
        scale, weight = tl.exp2(m - safe), tl.exp2(lse - safe)
        total = total * scale + weight
        acc = acc * scale[:, None] + values * weight[:, None]
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


# the block-table width and the split count change from step to step: not specialized on (one compile serves)
@triton.jit(do_not_specialize=["stride_bt", "max_splits"])
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, part_out_ptr, part_lse_ptr, counters_ptr,
                   block_tables_ptr, seq_lens_ptr, query_start_ptr, scales_ptr, scales_kv_stride,
                   stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_cb, stride_ct, stride_ch, stride_bt,
                   scale_log2, max_splits, window, softcap_log2,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MIN_PER_SPLIT: tl.constexpr,
                   SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    token = tl.load(query_start_ptr + seq)
    if tl.load(query_start_ptr + seq + 1) - token != 1:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)  # a sliding window reads only its tokens
    splits = tl.maximum(tl.minimum(max_splits, tl.cdiv(seq_len - first, MIN_PER_SPLIT)), 1)  # this sequence's
    if split >= splits:
        return
    per_split = tl.cdiv(tl.cdiv(seq_len - first, splits), BLOCK_N) * BLOCK_N
    start = first + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    row_mask = rows < GROUP
    dims = tl.arange(0, HEAD_PAD)
    rows_over_dims = over_dims(row_mask, dims, HEAD_DIM, HEAD_PAD)
    q = tl.load(q_ptr + token * stride_qt + heads[:, None] * stride_qh + dims[None, :], mask=rows_over_dims,
                other=0.0)
    scale_log2 *= cache_scale(scales_ptr, kv_head, k_ptr)  # a float8 cache's K / scale: the scale joins the score's
    if k_ptr.dtype.element_ty == tl.float8e4nv and q_ptr.dtype.element_ty == tl.bfloat16:
        # a float8 cache widens to fp16 in one conversion on Hopper (to bf16 in several: 184 us against 148 at
        # W1's shape, benchmarks/kernels.py); q joins it, shifted by 2^-8 into fp16's range, undone in the scale
        q = tl.clamp(q.to(tl.float32) * Q_SHIFT, -65504.0, 65504.0).to(tl.float16)
        scale_log2 = scale_log2 / Q_SHIFT
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    for n_start in range(start, end, BLOCK_N):
        positions = n_start + tl.arange(0, BLOCK_N)
        valid = positions < end
        k, v = load_kv_tile(k_ptr, v_ptr, block_tables_ptr, seq, positions, valid, kv_head, dims,
                            stride_bt, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, HEAD_DIM, HEAD_PAD)
        # base 2: exp2 is fast
        k, v = k.to(q.dtype), v.to(q.dtype)  # a float8 cache's values widened, exactly (else: as they are)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        scores = tl.where(valid[None, :], soft_capped(scores, softcap_log2, SOFTCAP), float("-inf"))
        m, l, acc = online_softmax_step(scores, v, m, l, acc, PRECISION)
    acc *= cache_scale(scales_ptr + scales_kv_stride, kv_head, k_ptr)  # and V's scale the weighted sum's
    safe_l = tl.where(l > 0, l, 1.0)  # an empty context (graph padding) gives zeros
    if splits == 1:
        tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 (acc / safe_l[:, None]).to(out_ptr.dtype.element_ty), mask=rows_over_dims)
    else:
        part = (seq * GROUP * tl.num_programs(1) + heads) * max_splits  # [seq, head, split] of the first split
        tl.store(part_out_ptr + (part + split)[:, None] * HEAD_DIM + dims[None, :], acc / safe_l[:, None],
                 mask=rows_over_dims)
        tl.store(part_lse_ptr + part + split, tl.where(l > 0, m + tl.log2(safe_l), float("-inf")), mask=row_mask)
        # acq_rel: this split's stores are visible to whoever counts last, and that one sees all the others'
        counter = counters_ptr + seq * tl.num_programs(1) + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel") == splits - 1:
            tl.store(counter, 0)  # ready for the next layer
            _combine_splits(out_ptr, part_out_ptr, part_lse_ptr, part, heads, row_mask, dims, token, stride_ot,
                            stride_oh, splits, GROUP_PAD, HEAD_DIM, HEAD_PAD)


@dataclass(frozen=True)
class DecodeTile:
    """How each program walks its share of a context: block_n tokens a tile; Triton's warps and pipeline stages.
    The defaults serve every cache: on an H100 (benchmarks/kernels.py --sweep, GQA groups 2 and 4, bf16 and
    float8 caches) they are within 1% of the best of 12 tiles. Measured and dropped
    (benchmarks/results/kernels-nvidia-h100-*20261206T14*.json): sums on the CUDA cores for small GQA groups,
    353-947 us against 151 for tl.dot over a float8 cache at W1's shape; float8 products of K as stored with the
    query in two float8 parts, 167 us against 153."""
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3


def split_counters(num_seqs: int, num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """The count of finished splits per (sequence, KV head): zeros, and zeros again after every launch."""
    return torch.zeros(num_seqs * num_kv_heads, dtype=torch.int32, device=device)


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, max_splits: int,
                 counters: torch.Tensor | None = None, min_per_split: int = 128, window: int | None = None,
                 softcap: float | None = None, kv_scales: torch.Tensor | None = None,
                 tile: DecodeTile | None = None) -> None:
    """q, out: [tokens, heads, head_dim]; kv_cache: [2, blocks, block_size, kv_heads, head_dim]; window: attend
    to the last `window` positions only (sliding-window layers); softcap: scores capped to
    softcap * tanh(score / softcap) (Gemma 2); kv_scales: [2, kv_heads] float32, a float8 cache's (default ones).

    max_splits: the most programs one sequence's context is split over (each sequence takes one per
    `min_per_split` tokens, up to this); counters: from split_counters() for at least as many sequences (kept
    by the caller so a CUDA graph holds one buffer; made here when None); tile: DecodeTile()'s when None."""
    num_seqs = seq_lens.shape[0]
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    group = q.shape[1] // num_kv_heads
    tile = tile or DecodeTile()
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    part_out = part_lse = out  # unused placeholders when no sequence splits
    if max_splits > 1:
        part_out = torch.empty(num_seqs, q.shape[1], max_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, q.shape[1], max_splits, dtype=torch.float32, device=q.device)
    if counters is None:
        counters = split_counters(num_seqs, num_kv_heads, q.device)
    kv_scales = unit_kv_scales(kv_cache) if kv_scales is None else kv_scales
    _decode_kernel[(num_seqs, num_kv_heads, max_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, counters, block_tables, seq_lens, query_start_loc,
        kv_scales, kv_scales.stride(0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        scale * LOG2E, max_splits, window or 0, (softcap or 1.0) * LOG2E, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, HEAD_PAD=head_pad(head_dim),
        BLOCK_SIZE=block_size, BLOCK_N=tile.block_n, MIN_PER_SPLIT=min_per_split, SOFTCAP=softcap is not None,
        PRECISION=dot_precision(q.dtype), num_warps=tile.num_warps, num_stages=tile.num_stages)
