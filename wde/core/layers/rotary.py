"""Rotary position embedding (RoPE), with the scaling types of Hugging Face configs."""
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

if torch.cuda.is_available():  # Triton comes with CUDA builds of torch
    from wde.core.kernels.rotary import apply_rope


def rope_frequencies(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2], attention scaling) for the config's rope_parameters.

    Scaled variants (llama3, yarn, linear, longrope) come from transformers' own tables, so wde's positions
    match the reference exactly; only 'default' is computed here.
    """
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        divisors = getattr(config, "rope_freq_divisors", None)  # from a .gguf file's rope_freqs tensor
        return (inv_freq if divisors is None else inv_freq / torch.tensor(divisors)), 1.0
    if rope_type == "dynamic" or rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported (it depends on the sequence length at run "
                         "time)" if rope_type == "dynamic" else f"unknown rope_type {rope_type!r}")
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(attention_scaling)


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their positions, in the rotate-half (GPT-NeoX) layout that HF Llama/Qwen use."""

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int):
        super().__init__()
        inv_freq, scaling = rope_frequencies(config, head_dim)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.to(positions.device))
        # float32 cache, [max_positions, head_dim]: cos in the first half of each row, sin in the second
        self.register_buffer("cos_sin", torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1),
                             persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm: nn.Module | None = None,
                k_norm: nn.Module | None = None):
        """positions [tokens]; q [tokens, heads, head_dim], k [tokens, kv_heads, head_dim].

        q_norm / k_norm: RMSNorms over each head, applied first (Qwen3); on the GPU one kernel does it all, in
        place.
        """
        if q.is_cuda:
            apply_rope(q, k, positions, self.cos_sin, *head_norm_arguments(q_norm, k_norm))
            return q, k
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        cos, sin = self.cos_sin[positions].to(q.dtype)[:, None].chunk(2, dim=-1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def head_norm_arguments(q_norm: nn.Module | None, k_norm: nn.Module | None) -> tuple:
    """(q weight, k weight, eps) of the per-head norms the RoPE kernel applies first; (None, None, 0.0) without."""
    return (q_norm.weight, k_norm.weight, q_norm.eps) if q_norm is not None else (None, None, 0.0)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class Rotation:
    """One layer's rotation of q and k: its RotaryEmbedding, the tokens' positions and the optional per-head
    norms. The attention layer applies it, or hands it to a backend that fuses it with its K/V store."""

    rotary_emb: RotaryEmbedding
    positions: torch.Tensor
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary_emb(self.positions, q, k, self.q_norm, self.k_norm)
