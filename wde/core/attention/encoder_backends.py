"""Attention backends for encoders: every token of a sequence sees every other, and nothing is cached."""
import torch
import torch.nn.functional as F

from wde.core.attention.metadata import EncoderAttentionMetadata
from wde.core.interfaces import AttentionBackend


class EncoderTorchBackend(AttentionBackend):
    """The reference, on CPU and GPU: one scaled_dot_product_attention per sequence."""

    kind = "encoder"
    supports_cuda_graphs = False

    def forward(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_metadata: EncoderAttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for length in attn_metadata.seq_lens_host:
            rows = slice(start, start + length)
            out[rows] = F.scaled_dot_product_attention(q[rows].transpose(0, 1), k[rows].transpose(0, 1),
                                                       v[rows].transpose(0, 1), scale=layer.scale, enable_gqa=True,
                                                       attn_mask=window_mask(length, layer.sliding_window,
                                                                             q.device)).transpose(0, 1)
            start += length
        return out


def window_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Bidirectional sliding window: a token sees the positions less than `window` away, either side."""
    if window is None:
        return None
    positions = torch.arange(length, device=device)
    return (positions[:, None] - positions[None, :]).abs() < window


class EncoderFlashBackend(AttentionBackend):
    """torch's built-in flash-attention varlen kernel: the whole unpadded batch in one launch. For a fresh
    bidirectional batch nothing is faster here, and it needs no package beyond torch."""

    kind = "encoder"
    supports_cuda_graphs = False

    @classmethod
    def is_available(cls, config) -> str | None:
        if config.device.type != "cuda":
            return "flash attention needs a CUDA device"
        if config.model.dtype not in (torch.float16, torch.bfloat16):
            return f"flash attention needs float16 or bfloat16, not {config.model.dtype}"
        if config.model.head_dim % 8 or config.model.head_dim > 256:
            return f"flash attention needs head_dim a multiple of 8 up to 256, not {config.model.head_dim}"
        return None

    def forward(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_metadata: EncoderAttentionMetadata) -> torch.Tensor:
        cu, longest = attn_metadata.cu_seqlens, attn_metadata.max_seq_len
        reach = None if layer.sliding_window is None else layer.sliding_window - 1  # positions either side
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, longest, longest, 0.0, False, False,
                                                       scale=layer.scale, window_size_left=reach,
                                                       window_size_right=reach)[0]
