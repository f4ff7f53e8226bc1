"""Paged attention through the flash-attn package (the optional `flash` extra), where it is installed.

flash-attn reads a paged cache only in pages of a multiple of 256 tokens, so this backend needs block_size 256
(or 512, ...). K/V are stored by wde's Triton kernel; decode steps use flash_attn_with_kvcache, steps with
prefill use flash_attn_varlen_func with the block table.
"""
import importlib.util

import torch

from wde.core.attention.metadata import PagedAttentionMetadata
from wde.core.interfaces import AttentionBackend
from wde.core.kernels.store_kv import store_kv


class FlashAttnBackend(AttentionBackend):
    kind = "paged"
    supports_cuda_graphs = True

    @classmethod
    def is_available(cls, config) -> str | None:
        if importlib.util.find_spec("flash_attn") is None:
            return "the flash-attn package is not installed (pip install wde[flash])"
        if config.device.type != "cuda":
            return "flash-attn needs a CUDA device"
        if config.args.kv_cache_dtype == "fp8":
            return "wde's flash-attn path reads a KV cache of the model's dtype, not kv_cache_dtype='fp8'"
        if config.args.block_size % 256:
            return f"flash-attn pages the KV cache in multiples of 256 tokens; block_size is {config.args.block_size}"
        return None

    def __init__(self, config):
        super().__init__(config)
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
        self.varlen, self.with_kvcache = flash_attn_varlen_func, flash_attn_with_kvcache

    def forward(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_metadata: PagedAttentionMetadata) -> torch.Tensor:
        meta = attn_metadata
        store_kv(k, v, layer.kv_cache, meta.slot_mapping)
        k_cache, v_cache = layer.kv_cache[0], layer.kv_cache[1]
        # flash-attn's window counts the keys left of the query's own; its softcap of 0 is none
        extra = {"window_size": ((layer.sliding_window or 0) - 1, 0), "softcap": layer.logit_softcap or 0.0}
        if meta.max_query_len == 1:
            return self.with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=meta.seq_lens,
                                     block_table=meta.block_tables, softmax_scale=layer.scale, causal=True,
                                     **extra)[:, 0]
        cu_seqlens_k = torch.nn.functional.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        return self.varlen(q, k_cache, v_cache, meta.query_start_loc, cu_seqlens_k, meta.max_query_len,
                           meta.max_seq_len, softmax_scale=layer.scale, causal=True, block_table=meta.block_tables,
                           **extra)
