"""The pieces both paged attention kernels share: reading a tile of K/V through the block table, and folding a
tile into the online softmax."""
import triton
import triton.language as tl


@triton.jit
def load_kv_tile(k_ptr, v_ptr, block_tables_ptr, seq, positions, valid, kv_head, dims,
                 stride_bt, stride_cb, stride_ct, stride_ch, BLOCK_SIZE: tl.constexpr):
    """K and V rows [tile, head_dim] of `positions` of sequence `seq` (zeros where not `valid`)."""
    blocks = tl.load(block_tables_ptr + seq * stride_bt + positions // BLOCK_SIZE, mask=valid, other=0)
    offsets = blocks.to(tl.int64) * stride_cb + (positions % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
    k = tl.load(k_ptr + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
    v = tl.load(v_ptr + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
    return k, v


@triton.jit
def online_softmax_step(scores, v, m, l, acc):
    """Fold one tile of masked base-2 scores [rows, tile] and its values into the running row maximum m, sum l
    and unnormalized output acc."""
    m_new = tl.maximum(m, tl.max(scores, 1))
    p = tl.exp2(scores - m_new[:, None])
    alpha = tl.exp2(m - m_new)
    return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
