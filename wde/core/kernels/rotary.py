"""Rotary position embedding of q and k in one launch; optionally after a per-head RMSNorm (Qwen3's q_norm /
k_norm), so those heads are read and written once; and optionally with the K/V store folded in: the rotated
k and the v of each token go straight to their slot of the paged cache (k is then left as it came)."""
import torch
import triton
import triton.language as tl

from wde.core.kernels.paged_kv import cache_scale, over_dims, to_cache, unit_kv_scales


@triton.jit
def _rotate_heads(x_ptr, stride_t, stride_h, token, num_heads, cos, sin, norm_ptr, eps, out_ptr, stride_out_h,
                  scales, HAS_NORM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                  HEADS_PAD: tl.constexpr):
    """Heads of one token of x, normed (HAS_NORM) and rotated, written from out_ptr on (x itself: in place; a
    float8 cache: divided by each head's scale in `scales`, [HEADS_PAD, 1])."""
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HALF_PAD)
    mask = over_dims(heads < num_heads, dims, HALF, HALF_PAD)
    base = x_ptr + token * stride_t + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    if HAS_NORM:
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(a * a, 1) + tl.sum(b * b, 1)) / (2 * HALF) + eps)
        x1 = tl.load(norm_ptr + dims, mask=dims < HALF) * (a * rstd[:, None]).to(x1.dtype)
        x2 = tl.load(norm_ptr + HALF + dims, mask=dims < HALF) * (b * rstd[:, None]).to(x2.dtype)
    cos = cos.to(x1.dtype)[None, :]
    sin = sin.to(x1.dtype)[None, :]
    out = out_ptr + heads[:, None] * stride_out_h + dims[None, :]
    tl.store(out, to_cache(x1 * cos - x2 * sin, out_ptr, scales), mask=mask)  # out_ptr: x itself, or a cache
    tl.store(out + HALF, to_cache(x2 * cos + x1 * sin, out_ptr, scales), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, v_ptr, cache_ptr, slot_ptr, scales_ptr, positions_ptr, cos_sin_ptr, q_norm_ptr,
                 k_norm_ptr, eps, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, cache_kv_stride,
                 scales_kv_stride,
                 num_q_heads, num_k_heads, HAS_NORM: tl.constexpr, STORE: tl.constexpr, HALF: tl.constexpr,
                 HALF_PAD: tl.constexpr, Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr):
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token)
    dims = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_sin_ptr + position * 2 * HALF + dims, mask=dims < HALF)
    sin = tl.load(cos_sin_ptr + position * 2 * HALF + HALF + dims, mask=dims < HALF)
    _rotate_heads(q_ptr, stride_qt, stride_qh, token, num_q_heads, cos, sin, q_norm_ptr, eps,
                  q_ptr + token * stride_qt, stride_qh, 1.0, HAS_NORM, HALF, HALF_PAD, Q_HEADS_PAD)
    if STORE:
        slot = tl.load(slot_ptr + token)
        if slot >= 0:  # padding rows of a CUDA graph batch write nothing
            row = cache_ptr + slot.to(tl.int64) * num_k_heads * 2 * HALF  # [kv_heads, head_dim] of this slot
            heads = tl.arange(0, K_HEADS_PAD)
            known = tl.where(heads < num_k_heads, heads, 0)[:, None]
            k_scales = cache_scale(scales_ptr, known, cache_ptr)  # [K_HEADS_PAD, 1], or 1.0: not a float8 cache
            v_scales = cache_scale(scales_ptr + scales_kv_stride, known, cache_ptr)
            _rotate_heads(k_ptr, stride_kt, stride_kh, token, num_k_heads, cos, sin, k_norm_ptr, eps, row, 2 * HALF,
                          k_scales, HAS_NORM, HALF, HALF_PAD, K_HEADS_PAD)
            all_dims = tl.arange(0, 2 * HALF_PAD)
            mask = over_dims(heads < num_k_heads, all_dims, 2 * HALF, 2 * HALF_PAD)
            v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + all_dims[None, :], mask=mask)
            tl.store(row + cache_kv_stride + heads[:, None] * 2 * HALF + all_dims[None, :],
                     to_cache(v, row, v_scales), mask=mask)
    else:
        _rotate_heads(k_ptr, stride_kt, stride_kh, token, num_k_heads, cos, sin, k_norm_ptr, eps,
                      k_ptr + token * stride_kt, stride_kh, 1.0, HAS_NORM, HALF, HALF_PAD, K_HEADS_PAD)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
               q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 0.0,
               v: torch.Tensor | None = None, kv_cache: torch.Tensor | None = None,
               slot_mapping: torch.Tensor | None = None, kv_scales: torch.Tensor | None = None) -> None:
    """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim], rotated in place (rotate-half layout);
    cos_sin: [positions, head_dim] float32 (cos in the first half of a row, sin in the second).

    With v, kv_cache ([2, blocks, block_size, kv_heads, head_dim], contiguous) and slot_mapping ([tokens], -1
    for rows that must not be written): the rotated k and v are written to the cache instead, k left as is; a
    float8 cache holds them over kv_scales ([2, kv_heads] float32, default ones)."""
    if q.shape[0] == 0:
        return
    has_norm, store = q_norm is not None, kv_cache is not None
    if store:
        assert kv_cache.is_contiguous() and kv_cache.shape[-2:] == k.shape[1:]
        kv_scales = unit_kv_scales(kv_cache) if kv_scales is None else kv_scales
    else:
        v, kv_cache, slot_mapping, kv_scales = k, k, positions, cos_sin  # unused placeholders
    _rope_kernel[(q.shape[0],)](q, k, v, kv_cache, slot_mapping, kv_scales, positions, cos_sin,
                                q_norm if has_norm else q, k_norm if has_norm else k, eps,
                                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                kv_cache.stride(0) if store else 0, kv_scales.stride(0), q.shape[1], k.shape[1],
                                HAS_NORM=has_norm, STORE=store, HALF=q.shape[2] // 2,
                                HALF_PAD=triton.next_power_of_2(q.shape[2] // 2),
                                Q_HEADS_PAD=triton.next_power_of_2(q.shape[1]),
                                K_HEADS_PAD=triton.next_power_of_2(k.shape[1]))
