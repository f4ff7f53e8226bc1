"""Write each new token's K and V into its slot of the paged cache, both in one launch."""
import torch
import triton
import triton.language as tl

from wde.core.kernels.paged_kv import cache_scale, to_cache, unit_kv_scales


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, scales_ptr, stride_kt, stride_vt, cache_kv_stride,
                     scales_kv_stride, ROW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot < 0:  # padding rows of a CUDA graph batch write nothing
        return
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < ROW
    key = tl.load(k_ptr + token * stride_kt + offsets, mask=mask)
    value = tl.load(v_ptr + token * stride_vt + offsets, mask=mask)
    heads = tl.where(mask, offsets // HEAD_DIM, 0)
    k_scale = cache_scale(scales_ptr, heads, cache_ptr)
    v_scale = cache_scale(scales_ptr + scales_kv_stride, heads, cache_ptr)
    tl.store(cache_ptr + slot * ROW + offsets, to_cache(key, cache_ptr, k_scale), mask=mask)
    tl.store(cache_ptr + cache_kv_stride + slot * ROW + offsets, to_cache(value, cache_ptr, v_scale), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             kv_scales: torch.Tensor | None = None) -> None:
    """k, v: [tokens, kv_heads, head_dim] (each token's heads contiguous); kv_cache: [2, blocks, block_size,
    kv_heads, head_dim]; slot_mapping: [tokens], -1 for rows that must not be written; kv_scales: [2, kv_heads]
    float32, a float8 cache's (default ones)."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    row = k.shape[1] * k.shape[2]
    block = min(triton.next_power_of_2(row), 1024)
    kv_scales = unit_kv_scales(kv_cache) if kv_scales is None else kv_scales
    _store_kv_kernel[(num_tokens, triton.cdiv(row, block))](
        k, v, kv_cache, slot_mapping, kv_scales, k.stride(0), v.stride(0), kv_cache.stride(0), kv_scales.stride(0),
        ROW=row, HEAD_DIM=k.shape[2], BLOCK=block)
