"""Rotary position embedding of q and k in one launch; optionally after a per-head RMSNorm (Qwen3's q_norm /
k_norm), so those heads are read and written once; and optionally with the K/V store folded in: the rotated
k and the v of each token go straight to their slot of the paged cache (k is then left as it came)."""
import torch
import triton
import triton.language as tl

from wde.core.kernels.paged_kv import cast_for, over_dims


@triton.jit
def _rotate_heads(x_ptr, stride_t, stride_h, token, num_heads, cos, sin, norm_ptr, eps, out_ptr, stride_out_h,
                  HAS_NORM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr):
    """Heads of one token of x, normed (HAS_NORM) and rotated, written from out_ptr on (x itself: in place)."""
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
    tl.store(out, cast_for(x1 * cos - x2 * sin, out_ptr), mask=mask)  # out_ptr: x itself, or a (float8) cache
    tl.store(out + HALF, cast_for(x2 * cos + x1 * sin, out_ptr), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, v_ptr, cache_ptr, slot_ptr, positions_ptr, cos_sin_ptr, q_norm_ptr, k_norm_ptr, eps,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, cache_kv_stride,
                 num_q_heads, num_k_heads, HAS_NORM: tl.constexpr, STORE: tl.constexpr, HALF: tl.constexpr,
                 HALF_PAD: tl.constexpr, Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr):
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token)
    dims = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_sin_ptr + position * 2 * HALF + dims, mask=dims < HALF)
    sin = tl.load(cos_sin_ptr + position * 2 * HALF + HALF + dims, mask=dims < HALF)
    _rotate_heads(q_ptr, stride_qt, stride_qh, token, num_q_heads, cos, sin, q_norm_ptr, eps,
                  q_ptr + token * stride_qt, stride_qh, HAS_NORM, HALF, HALF_PAD, Q_HEADS_PAD)
    if STORE:
        slot = tl.load(slot_ptr + token)
        if slot >= 0:  # padding rows of a CUDA graph batch write nothing
            row = cache_ptr + slot.to(tl.int64) * num_k_heads * 2 * HALF  # [kv_heads, head_dim] of this slot
            _rotate_heads(k_ptr, stride_kt, stride_kh, token, num_k_heads, cos, sin, k_norm_ptr, eps, row, 2 * HALF,
                          HAS_NORM, HALF, HALF_PAD, K_HEADS_PAD)
            heads = tl.arange(0, K_HEADS_PAD)
            all_dims = tl.arange(0, 2 * HALF_PAD)
            mask = over_dims(heads < num_k_heads, all_dims, 2 * HALF, 2 * HALF_PAD)
            v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + all_dims[None, :], mask=mask)
            tl.store(row + cache_kv_stride + heads[:, None] * 2 * HALF + all_dims[None, :], cast_for(v, row), mask=mask)
    else:
        _rotate_heads(k_ptr, stride_kt, stride_kh, token, num_k_heads, cos, sin, k_norm_ptr, eps,
                      k_ptr + token * stride_kt, stride_kh, HAS_NORM, HALF, HALF_PAD, K_HEADS_PAD)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
               q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 0.0,
               v: torch.Tensor | None = None, kv_cache: torch.Tensor | None = None,
               slot_mapping: torch.Tensor | None = None) -> None:
    """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim], rotated in place (rotate-half layout);
    cos_sin: [positions, head_dim] float32 (cos in the first half of a row, sin in the second).

    With v, kv_cache ([2, blocks, block_size, kv_heads, head_dim], contiguous) and slot_mapping ([tokens], -1
    for rows that must not be written): the rotated k and v are written to the cache instead, k left as is."""
    if q.shape[0] == 0:
        return
    has_norm, store = q_norm is not None, kv_cache is not None
    if store:
        assert kv_cache.is_contiguous() and kv_cache.shape[-2:] == k.shape[1:]
    else:
        v, kv_cache, slot_mapping = k, k, positions  # unused placeholders
    _rope_kernel[(q.shape[0],)](q, k, v, kv_cache, slot_mapping, positions, cos_sin,
                                q_norm if has_norm else q, k_norm if has_norm else k, eps,
                                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                kv_cache.stride(0) if store else 0, q.shape[1], k.shape[1],
                                HAS_NORM=has_norm, STORE=store, HALF=q.shape[2] // 2,
                                HALF_PAD=triton.next_power_of_2(q.shape[2] // 2),
                                Q_HEADS_PAD=triton.next_power_of_2(q.shape[1]),
                                K_HEADS_PAD=triton.next_power_of_2(k.shape[1]))
