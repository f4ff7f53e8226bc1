"""wde's own paged attention on the GPU: Triton kernels for storing K/V, prefill chunks and split-KV decode."""
import torch

from wde.core.attention.metadata import PagedAttentionMetadata
from wde.core.interfaces import AttentionBackend
from wde.core.kernels.paged_decode import paged_decode, split_counters
from wde.core.kernels.paged_prefill import paged_prefill
from wde.core.kernels.rotary import apply_rope
from wde.core.kernels.store_kv import store_kv
from wde.core.layers.rotary import Rotation, head_norm_arguments

MIN_TOKENS_PER_SPLIT = 128  # below this a split's fixed cost outweighs the extra parallelism


class TritonAttentionBackend(AttentionBackend):
    kind = "paged"
    supports_cuda_graphs = True
    supports_prefill_cuda_graphs = True  # both kernels find each sequence's rows and lengths on the device
    fuses_rotation = True

    def __init__(self, config):
        super().__init__(config)
        self.num_sms = (torch.cuda.get_device_properties(config.device).multi_processor_count
                        if config.device.type == "cuda" else 1)
        # one buffer for every layer and step (a CUDA graph replays with it): each launch leaves it zeroed
        self.split_counters = split_counters(config.args.max_num_seqs, config.model.num_kv_heads, config.device)

    def forward(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_metadata: PagedAttentionMetadata, rotation: Rotation | None = None) -> torch.Tensor:
        meta = attn_metadata
        if rotation is None:
            store_kv(k, v, layer.kv_cache, meta.slot_mapping, layer.kv_scales)
        else:  # one kernel: q rotated in place, k rotated into its cache slot beside v
            apply_rope(q, k, rotation.positions, rotation.rotary_emb.cos_sin,
                       *head_norm_arguments(rotation.q_norm, rotation.k_norm), v, layer.kv_cache, meta.slot_mapping,
                       layer.kv_scales)
        out = torch.empty_like(q)
        if meta.min_query_len == 1:
            context = min(meta.max_seq_len, layer.sliding_window or meta.max_seq_len)
            paged_decode(q, layer.kv_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc, layer.scale,
                         self.num_splits(meta.num_seqs, layer.num_kv_heads, context), self.split_counters,
                         MIN_TOKENS_PER_SPLIT, window=layer.sliding_window, softcap=layer.logit_softcap,
                         kv_scales=layer.kv_scales)
        if meta.max_query_len > 1:
            paged_prefill(q, layer.kv_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                          layer.scale, window=layer.sliding_window, softcap=layer.logit_softcap,
                          kv_scales=layer.kv_scales)
        return out

    def num_splits(self, num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
        """Enough (sequence, KV head, split) programs for a few waves over the GPU, none of them tiny (each
        sequence then takes as many of them as its own length asks for)."""
        wanted = -(-4 * self.num_sms // (num_seqs * num_kv_heads))
        return max(1, min(wanted, 16, -(-max_seq_len // MIN_TOKENS_PER_SPLIT)))
