"""wde's own paged attention on the GPU: Triton kernels for storing K/V, prefill chunks and split-KV decode."""
import torch

from wde.core.attention.metadata import PagedAttentionMetadata
from wde.core.interfaces import AttentionBackend
from wde.core.kernels.paged_decode import paged_decode
from wde.core.kernels.paged_prefill import paged_prefill
from wde.core.kernels.store_kv import store_kv

MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost outweighs the extra parallelism


class TritonAttentionBackend(AttentionBackend):
    kind = "paged"
    supports_cuda_graphs = True

    @classmethod
    def is_available(cls, config) -> str | None:
        """None when the backend can run with `config`, else why not."""
        head_dim = config.model.head_dim
        if head_dim & (head_dim - 1):
            return f"head_dim {head_dim} is not a power of two"
        return None

    def __init__(self, config):
        super().__init__(config)
        self.num_sms = (torch.cuda.get_device_properties(config.device).multi_processor_count
                        if config.device.type == "cuda" else 1)

    def forward(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_metadata: PagedAttentionMetadata) -> torch.Tensor:
        meta = attn_metadata
        store_kv(k, v, layer.kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.min_query_len == 1:
            paged_decode(q, layer.kv_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc, layer.scale,
                         self.num_splits(meta.num_seqs, layer.num_kv_heads, meta.max_seq_len))
        if meta.max_query_len > 1:
            paged_prefill(q, layer.kv_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                          layer.scale)
        return out

    def num_splits(self, num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
        """Enough (sequence, KV head, split) programs for a few waves over the GPU, none of them tiny."""
        wanted = -(-4 * self.num_sms // (num_seqs * num_kv_heads))
        return max(1, min(wanted, 16, -(-max_seq_len // MIN_TOKENS_PER_SPLIT)))
