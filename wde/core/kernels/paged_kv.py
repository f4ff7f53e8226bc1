"""The pieces both paged attention kernels share: reading a tile of K/V through the block table, capping its
scores (Gemma's logit soft-capping), and folding a tile into the online softmax."""
import torch
import triton
import triton.language as tl


def dot_precision(dtype: torch.dtype) -> str:
    """How tl.dot multiplies: a float32 model's attention exactly ("ieee", as torch's float32 matmuls do), not in
    TF32, whose 10-bit mantissas moved greedy picks of float32 test models on a GPU; 16-bit inputs multiply
    exactly on the tensor cores either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def head_pad(head_dim: int) -> int:
    """The head width the kernels compute on: a power of two (tl.arange) of at least 16 (tl.dot on a GPU); the
    dims past head_dim (Phi-3's 96 computes on 128) are masked off."""
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def over_dims(rows_mask, dims, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
    """rows_mask [rows] as the mask of [rows, HEAD_PAD] loads and stores: the padding dims off. Without padding
    it stays [rows, 1], broadcast: no per-dim test in the hot loops of power-of-two heads."""
    mask = rows_mask[:, None]
    if HEAD_PAD != HEAD_DIM:
        mask = mask & (dims < HEAD_DIM)[None, :]
    return mask


@triton.jit
def load_kv_tile(k_ptr, v_ptr, block_tables_ptr, seq, positions, valid, kv_head, dims,
                 stride_bt, stride_cb, stride_ct, stride_ch, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HEAD_PAD: tl.constexpr):
    """K and V rows [tile, HEAD_PAD] of `positions` of sequence `seq` (zeros where not `valid`, and past
    HEAD_DIM)."""
    blocks = tl.load(block_tables_ptr + seq * stride_bt + positions // BLOCK_SIZE, mask=valid, other=0)
    offsets = blocks.to(tl.int64) * stride_cb + (positions % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
    mask = over_dims(valid, dims, HEAD_DIM, HEAD_PAD)
    k = tl.load(k_ptr + offsets[:, None] + dims[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + offsets[:, None] + dims[None, :], mask=mask, other=0.0)
    return k, v  # in the cache's type: the kernels take them to the queries' before their products


@triton.jit
def cast_for(x, ptr):
    """x as the element type of the tensor at `ptr` (a KV cache, float8 activations). Float8 (e4m3) saturates
    at +-448 (a plain cast would make NaN), and each value is first rounded to 3 mantissa bits in float32, to
    nearest even, by integer arithmetic whose carry moves into the exponent: the cast is then exact. The GPU's
    cast rounds the same way; Triton's interpreter rounds a value that carries into the next power of two to
    half of it (126.6 to 64, not 128)."""
    if ptr.dtype.element_ty == tl.float8e4nv:
        x = tl.clamp(x.to(tl.float32), -448.0, 448.0)
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & ~0xFFFFF  # 23 mantissa bits -> 3
        # below 2^-6 float8 is subnormal, a multiple of 2^-9: adding 1.5 * 2^14 (whose float32 ulp is 2^-9)
        # rounds to one, to nearest even
        subnormal = (x + 24576.0) - 24576.0
        x = tl.where(tl.abs(x) < 0.015625, subnormal, bits.to(tl.float32, bitcast=True))
    return x.to(ptr.dtype.element_ty)


@triton.jit
def to_cache(x, cache_ptr, scale):
    """x as an entry of the cache at `cache_ptr`: a float8 cache holds x / scale (its head's; a cache of the
    model's dtype has no scale: `scale` is not read)."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        x = x.to(tl.float32) / scale
    return cast_for(x, cache_ptr)


@triton.jit
def cache_scale(scales_ptr, index, cache_ptr):
    """The scale at scales_ptr + index when the cache at `cache_ptr` is float8, else 1.0 (nothing read)."""
    scale = 1.0
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        scale = tl.load(scales_ptr + index)
    return scale


def unit_kv_scales(kv_cache: torch.Tensor) -> torch.Tensor:
    """Scales of one for each KV head of `kv_cache` [2, blocks, block_size, kv_heads, head_dim]: the kernels'
    default (a layer passes its own, wde/core/kv_cache/kv_scales.py)."""
    return torch.ones(2, kv_cache.shape[-2], dtype=torch.float32, device=kv_cache.device)


@triton.jit
def online_softmax_step(scores, v, m, l, acc, PRECISION: tl.constexpr):
    """Fold one tile of masked base-2 scores [rows, tile] and its values into the running row maximum m, sum l
    and unnormalized output acc. A row may have seen no key yet (a sliding window that starts past this tile):
    its maximum stays -inf, and it takes nothing from the tile (not NaN)."""
    m_new = tl.maximum(m, tl.max(scores, 1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)


@triton.jit
def soft_capped(scores, softcap_log2, SOFTCAP: tl.constexpr):
    """Base-2 scores s * log2(e) capped as softcap * tanh(s / softcap), in the same base (softcap_log2 =
    softcap * log2(e)); unchanged when not SOFTCAP. tanh(x) = 1 - 2 / (exp(2x) + 1), which saturates cleanly."""
    if SOFTCAP:
        x = scores / softcap_log2
        scores = softcap_log2 * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))
    return scores
