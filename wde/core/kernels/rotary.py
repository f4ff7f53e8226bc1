"""Rotary position embedding of q and k in place, in one launch; optionally after a per-head RMSNorm
(Qwen3's q_norm / k_norm), so those heads are read and written once."""
import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, stride_t, stride_h, token, num_heads, cos, sin, norm_ptr, eps,
                  HAS_NORM: tl.constexpr, HALF: tl.constexpr, HEADS_PAD: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HALF)
    mask = (heads < num_heads)[:, None]
    base = x_ptr + token * stride_t + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    if HAS_NORM:
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(a * a, 1) + tl.sum(b * b, 1)) / (2 * HALF) + eps)
        x1 = tl.load(norm_ptr + dims) * (a * rstd[:, None]).to(x1.dtype)
        x2 = tl.load(norm_ptr + HALF + dims) * (b * rstd[:, None]).to(x2.dtype)
    cos = cos.to(x1.dtype)[None, :]
    sin = sin.to(x1.dtype)[None, :]
    tl.store(base, x1 * cos - x2 * sin, mask=mask)
    tl.store(base + HALF, x2 * cos + x1 * sin, mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, positions_ptr, cos_sin_ptr, q_norm_ptr, k_norm_ptr, eps,
                 stride_qt, stride_qh, stride_kt, stride_kh, num_q_heads, num_k_heads,
                 HAS_NORM: tl.constexpr, HALF: tl.constexpr, Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr):
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token)
    dims = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + position * 2 * HALF + dims)
    sin = tl.load(cos_sin_ptr + position * 2 * HALF + HALF + dims)
    _rotate_heads(q_ptr, stride_qt, stride_qh, token, num_q_heads, cos, sin, q_norm_ptr, eps, HAS_NORM, HALF,
                  Q_HEADS_PAD)
    _rotate_heads(k_ptr, stride_kt, stride_kh, token, num_k_heads, cos, sin, k_norm_ptr, eps, HAS_NORM, HALF,
                  K_HEADS_PAD)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
               q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 0.0) -> None:
    """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim], rotated in place (rotate-half layout);
    cos_sin: [positions, head_dim] float32 (cos in the first half of a row, sin in the second)."""
    if q.shape[0] == 0:
        return
    has_norm = q_norm is not None
    _rope_kernel[(q.shape[0],)](q, k, positions, cos_sin, q_norm if has_norm else q, k_norm if has_norm else k,
                                eps, q.stride(0), q.stride(1), k.stride(0), k.stride(1), q.shape[1], k.shape[1],
                                HAS_NORM=has_norm, HALF=q.shape[2] // 2,
                                Q_HEADS_PAD=triton.next_power_of_2(q.shape[1]),
                                K_HEADS_PAD=triton.next_power_of_2(k.shape[1]))
