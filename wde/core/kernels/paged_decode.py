"""Decode attention over the paged KV cache: one new token per sequence, its context split across programs.

Grid: (sequences, KV heads, splits). A program takes the query rows of every query head that shares one KV
head (GQA), so each K/V tile is read once for the whole group, and walks its share of the context with an
online softmax. With one split it writes the output; with several, each writes a partial result and its
log-sum-exp, and a second kernel combines them. Splitting keeps the GPU busy when few sequences have long
contexts. Sequences whose step is not a single-token decode are skipped (the prefill kernel takes them).
"""
import torch
import triton
import triton.language as tl

from wde.core.kernels.paged_kv import load_kv_tile, online_softmax_step

LOG2E = 1.4426950408889634


# the block-table width and the split count change from step to step: not specialized on (one compile serves)
@triton.jit(do_not_specialize=["stride_bt", "num_splits"])
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, part_out_ptr, part_lse_ptr,
                   block_tables_ptr, seq_lens_ptr, query_start_ptr,
                   stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_cb, stride_ct, stride_ch, stride_bt,
                   scale_log2, num_splits,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, ONE_SPLIT: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    token = tl.load(query_start_ptr + seq)
    if tl.load(query_start_ptr + seq + 1) - token != 1:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    row_mask = rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + token * stride_qt + heads[:, None] * stride_qh + dims[None, :], mask=row_mask[:, None],
                other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for n_start in range(start, end, BLOCK_N):
        positions = n_start + tl.arange(0, BLOCK_N)
        valid = positions < end
        k, v = load_kv_tile(k_ptr, v_ptr, block_tables_ptr, seq, positions, valid, kv_head, dims,
                            stride_bt, stride_cb, stride_ct, stride_ch, BLOCK_SIZE)
        scores = tl.dot(q, tl.trans(k)) * scale_log2  # base-2 logits: exp2 is the fast exponential
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m, l, acc = online_softmax_step(scores, v, m, l, acc)
    if ONE_SPLIT:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]  # an empty context (graph padding) gives zeros
        tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    else:
        part = (seq * GROUP * tl.num_programs(1) + heads) * num_splits + split  # [seq, head, split]
        safe_l = tl.where(l > 0, l, 1.0)
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc / safe_l[:, None],
                 mask=row_mask[:, None])
        lse = tl.where(l > 0, m + tl.log2(safe_l), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_mask)


@triton.jit
def _combine_kernel(out_ptr, part_out_ptr, part_lse_ptr, query_start_ptr, stride_ot, stride_oh, num_splits,
                    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start_ptr + seq)
    if tl.load(query_start_ptr + seq + 1) - token != 1:
        return
    splits = tl.arange(0, SPLITS_PAD)
    part = (seq * tl.num_programs(1) + head) * num_splits + splits
    lse = tl.load(part_lse_ptr + part, mask=splits < num_splits, other=float("-inf"))
    top = tl.max(lse, 0)
    weights = tl.exp2(lse - tl.where(top > float("-inf"), top, 0.0))
    dims = tl.arange(0, HEAD_DIM)
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=(splits < num_splits)[:, None],
                    other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, num_splits: int,
                 block_n: int = 64) -> None:
    """q, out: [tokens, heads, head_dim]; kv_cache: [2, blocks, block_size, kv_heads, head_dim]."""
    num_seqs = seq_lens.shape[0]
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    group = q.shape[1] // num_kv_heads
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    one_split = num_splits == 1
    part_out = part_lse = out  # unused placeholders when there is one split
    if not one_split:
        part_out = torch.empty(num_seqs, q.shape[1], num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, q.shape[1], num_splits, dtype=torch.float32, device=q.device)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, block_tables, seq_lens, query_start_loc,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        scale * LOG2E, num_splits, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=block_n, ONE_SPLIT=one_split, num_warps=4)
    if not one_split:
        _combine_kernel[(num_seqs, q.shape[1])](
            out, part_out, part_lse, query_start_loc, out.stride(0), out.stride(1), num_splits,
            HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(num_splits))
