"""Write each new token's K and V into its slot of the paged cache, both in one launch."""
import torch
import triton
import triton.language as tl

from wde.core.kernels.paged_kv import cast_for


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, stride_kt, stride_vt, cache_kv_stride,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot < 0:  # padding rows of a CUDA graph batch write nothing
        return
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < ROW
    key = tl.load(k_ptr + token * stride_kt + offsets, mask=mask)
    value = tl.load(v_ptr + token * stride_vt + offsets, mask=mask)
    tl.store(cache_ptr + slot * ROW + offsets, cast_for(key, cache_ptr), mask=mask)
    tl.store(cache_ptr + cache_kv_stride + slot * ROW + offsets, cast_for(value, cache_ptr), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [tokens, kv_heads, head_dim] (each token's heads contiguous); kv_cache: [2, blocks, block_size,
    kv_heads, head_dim]; slot_mapping: [tokens], -1 for rows that must not be written."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    row = k.shape[1] * k.shape[2]
    block = min(triton.next_power_of_2(row), 1024)
    _store_kv_kernel[(num_tokens, triton.cdiv(row, block))](
        k, v, kv_cache, slot_mapping, k.stride(0), v.stride(0), kv_cache.stride(0), ROW=row, BLOCK=block)
