"""The reference attention backend: plain torch over the paged KV cache, on CPU and GPU.

It favours being obviously right over speed: each prefilling sequence gathers its context from its blocks and
runs one scaled_dot_product_attention; all decoding sequences (one new token each) share one padded call.
"""
import torch
import torch.nn.functional as F

from wde.core.attention.metadata import PagedAttentionMetadata
from wde.core.interfaces import AttentionBackend
from wde.core.layers.fp8 import FP8_MAX


def as_cache_values(x: torch.Tensor, cache: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [tokens, kv_heads, head_dim] in the cache's dtype: a float8 cache holds x / its head's scale, saturated
    at +-448 (a plain cast would make NaN of larger values)."""
    if cache.dtype == torch.float8_e4m3fn:
        return (x.float() / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(cache.dtype)
    return x


def store_kv_torch(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   kv_scales: torch.Tensor) -> None:
    """Write each new token's K and V into its cache slot (the torch reference of kernels/store_kv.py);
    kv_scales: [2, kv_heads], read for a float8 cache only."""
    num_kv_heads, head_dim = k.shape[1:]
    k, v = as_cache_values(k, kv_cache, kv_scales[0]), as_cache_values(v, kv_cache, kv_scales[1])
    if kv_cache.dtype == torch.float8_e4m3fn:  # index_copy_ has no float8 kernel on the CPU: copy the bytes
        kv_cache, k, v = kv_cache.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_context(cache: torch.Tensor, block_tables: torch.Tensor, num_tokens: int, dtype: torch.dtype,
                   scales: torch.Tensor) -> torch.Tensor:
    """[num_seqs, num_blocks] block ids -> [num_seqs, kv_heads, num_tokens, head_dim] of cached K or V, as
    `dtype` (the queries'); a float8 cache's entries times their head's scale ([kv_heads])."""
    block_size = cache.shape[1]
    num_blocks = -(-num_tokens // block_size)
    gathered = cache[block_tables[:, :num_blocks]]  # [seqs, blocks, block_size, kv_heads, head_dim]
    gathered = gathered.flatten(1, 2)[:, :num_tokens].transpose(1, 2)
    if cache.dtype == torch.float8_e4m3fn:
        return (gathered.float() * scales[:, None, None]).to(dtype)
    return gathered.to(dtype)


def attend(layer, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of q [batch, heads, queries, head_dim] over keys and values [batch, kv_heads, keys, head_dim]
    where `mask` allows; with the layer's soft-capping, by hand (scaled_dot_product_attention has no cap)."""
    if layer.logit_softcap is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=layer.scale, enable_gqa=True)
    group = q.shape[1] // keys.shape[1]
    scores = q @ keys.repeat_interleave(group, dim=1).transpose(-1, -2) * layer.scale
    scores = layer.logit_softcap * torch.tanh(scores / layer.logit_softcap)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ values.repeat_interleave(group, dim=1)


class TorchAttentionBackend(AttentionBackend):
    kind = "paged"
    supports_cuda_graphs = False  # it reads sequence lengths on the host

    def forward(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_metadata: PagedAttentionMetadata) -> torch.Tensor:
        store_kv_torch(k, v, layer.kv_cache, attn_metadata.slot_mapping, layer.kv_scales)
        out = torch.empty_like(q)
        starts = attn_metadata.query_start_loc.tolist()
        decoding = [i for i, n in enumerate(attn_metadata.query_lens_host) if n == 1]
        if decoding:
            rows = torch.tensor([starts[i] for i in decoding], device=q.device)
            out[rows] = self._decode(layer, q[rows], attn_metadata, decoding)
        for i, query_len in enumerate(attn_metadata.query_lens_host):
            if query_len > 1:
                start = starts[i]
                out[start:start + query_len] = self._prefill(layer, q[start:start + query_len], attn_metadata, i)
        return out

    def _prefill(self, layer, q: torch.Tensor, meta: PagedAttentionMetadata, seq: int) -> torch.Tensor:
        """One sequence's new tokens attend causally to its whole context (cached prefix + themselves)."""
        seq_len, query_len = meta.seq_lens_host[seq], q.shape[0]
        table = meta.block_tables[seq:seq + 1]
        keys = gather_context(layer.kv_cache[0], table, seq_len, q.dtype, layer.kv_scales[0])
        values = gather_context(layer.kv_cache[1], table, seq_len, q.dtype, layer.kv_scales[1])
        query_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)[:, None]
        key_pos = torch.arange(seq_len, device=q.device)[None, :]
        mask = key_pos <= query_pos
        if layer.sliding_window is not None:
            mask &= key_pos > query_pos - layer.sliding_window
        return attend(layer, q.transpose(0, 1)[None], keys, values, mask)[0].transpose(0, 1)

    def _decode(self, layer, q: torch.Tensor, meta: PagedAttentionMetadata, seqs: list[int]) -> torch.Tensor:
        """One new token per sequence, padded to the longest context; padding is masked out."""
        seq_lens = meta.seq_lens[seqs]
        longest = max(meta.seq_lens_host[i] for i in seqs)
        block_tables = meta.block_tables[seqs]
        keys = gather_context(layer.kv_cache[0], block_tables, longest, q.dtype, layer.kv_scales[0])
        values = gather_context(layer.kv_cache[1], block_tables, longest, q.dtype, layer.kv_scales[1])
        key_pos = torch.arange(longest, device=q.device)[None, :]
        mask = key_pos < seq_lens[:, None]
        if layer.sliding_window is not None:
            mask &= key_pos >= seq_lens[:, None] - layer.sliding_window
        return attend(layer, q[:, :, None], keys, values, mask[:, None, None])[:, :, 0]
