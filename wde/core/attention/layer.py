"""The attention layer models use: multi-head (GQA) attention over the paged KV cache."""
import torch
from torch import nn

from wde.core.forward_context import get_attn_metadata
from wde.core.interfaces import AttentionBackend
from wde.core.layers.rotary import Rotation


class Attention(nn.Module):
    """q, k, v come in as [num_tokens, heads * head_dim]; the bound AttentionBackend does the work.

    The Worker binds `backend`, this layer's slice of the KV cache (`kv_cache`, shaped
    [2, num_blocks, block_size, num_kv_heads, head_dim]), the scales of a float8 cache (`kv_scales`, [2 (K, V),
    num_kv_heads] float32: an entry holds value / scale, wde/core/kv_cache/kv_scales.py) and its KV layer group
    (`kv_group`: which of the step's block tables and slot mappings it reads, wde/core/kv_cache/layer_groups.py)
    before the first step.
    """

    uses_kv_cache = True  # decoders keep K/V in the paged cache; EncoderAttention does not

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logit_softcap: float | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} attention heads cannot be grouped over {num_kv_heads} KV heads")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window={sliding_window}: a window holds at least 1 token")
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.sliding_window = sliding_window  # each token attends to the last `sliding_window` positions only
        self.logit_softcap = logit_softcap  # scores capped to softcap * tanh(score / softcap) (Gemma 2)
        self.backend: AttentionBackend | None = None
        self.kv_cache: torch.Tensor | None = None
        self.kv_scales: torch.Tensor | None = None
        self.kv_group = 0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotation: Rotation | None = None
                ) -> torch.Tensor:
        """rotation: how q and k are rotated by their positions (RoPE) before attention, if they are."""
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        metadata = get_attn_metadata()
        if self.kv_group:
            metadata = metadata.for_group(self.kv_group)
        if rotation is not None and self.backend.fuses_rotation:
            out = self.backend.forward(self, q, k, v, metadata, rotation=rotation)
        else:
            if rotation is not None:
                q, k = rotation.apply(q, k)
            out = self.backend.forward(self, q, k, v, metadata)
        return out.view(num_tokens, self.num_heads * self.head_dim)


class EncoderAttention(Attention):
    """Bidirectional attention within each sequence of the flat batch, with no KV cache (BERT-like encoders;
    with a sliding window, each token sees the positions less than it away on either side: EmbeddingGemma)."""

    uses_kv_cache = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logit_softcap: float | None = None):
        if logit_softcap is not None:
            raise ValueError("encoder attention has no soft-capped scores (attn_logit_softcapping)")
        super().__init__(num_heads, num_kv_heads, head_dim, scale, sliding_window)
