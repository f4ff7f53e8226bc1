"""GPT-2: learned position embeddings, pre-LayerNorm blocks, GELU (tanh), one fused q/k/v projection, and an LM
head tied to the token embeddings. transformers stores its projections as Conv1D, [in, out]: loaded
transposed. Built from wde's tensor-parallel layers, so it splits over ranks like wde's own models."""
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from wde.core.attention.layer import Attention
from wde.core.config import ModelConfig
from wde.core.layers.embedding import VocabParallelEmbedding
from wde.core.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, materialize
from wde.core.loader.model_loader import load_params


def transposed(loader):
    """A parameter loader fed Conv1D's [in, out] weights as Linear's [out, in]."""
    def load(param: nn.Parameter, loaded, *shard) -> None:
        tensor = materialize(loaded)
        loader(param, tensor.t() if tensor.dim() == 2 else tensor, *shard)
    return load


class FusedQKV(QKVParallelLinear):
    """GPT-2's c_attn: q, k and v in one checkpoint tensor, each split over the ranks as wde splits heads."""

    def __init__(self, hidden: int, heads: int, head_dim: int):
        super().__init__(hidden, head_dim, heads, heads, bias=True)
        self.hidden = hidden
        for param in self.parameters():
            param.shard_ids = (None,)
            param.weight_loader = transposed(self._load_fused)

    def _load_fused(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        for index, name in enumerate("qkv"):
            self._load_shard(param, loaded.narrow(0, index * self.hidden, self.hidden), name)


class GPT2Attention(nn.Module):
    def __init__(self, model_config: ModelConfig):
        super().__init__()
        hidden, heads, head_dim = model_config.hf_config.hidden_size, model_config.num_heads, model_config.head_dim
        self.c_attn = FusedQKV(hidden, heads, head_dim)
        (first_head, local_heads), _ = self.c_attn.q_heads, self.c_attn.kv_heads
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True, input_shard=(first_head * head_dim,
                                                                                local_heads * head_dim))
        self.c_proj.weight.weight_loader = transposed(self.c_proj.weight.weight_loader)
        self.attn = Attention(local_heads, local_heads, head_dim, scale=head_dim ** -0.5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(hidden).chunk(3, dim=-1)
        return self.c_proj(self.attn(q, k, v))


class GPT2MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.c_fc = MergedColumnParallelLinear(hidden, {"fc": inner}, bias=True)
        for param in self.c_fc.parameters():
            param.shard_ids = (None,)
            param.weight_loader = transposed(lambda p, t, fc=self.c_fc: fc._load_shard(p, t, "fc"))
        self.c_proj = RowParallelLinear(inner, hidden, bias=True)
        self.c_proj.weight.weight_loader = transposed(self.c_proj.weight.weight_loader)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, model_config: ModelConfig):
        super().__init__()
        config = model_config.hf_config
        hidden = config.hidden_size
        self.ln_1 = nn.LayerNorm(hidden, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(model_config)
        self.ln_2 = nn.LayerNorm(hidden, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(hidden, config.n_inner or 4 * hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden))
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    def __init__(self, model_config: ModelConfig):
        super().__init__()
        config = model_config.hf_config
        if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function {config.activation_function!r} is not supported (gelu_new)")
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(model_config) for _ in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            hidden = block(hidden)
        return self.ln_f(hidden)


class GPT2LMHeadModel(nn.Module):
    supports_tensor_parallel = True
    pooling = "last"

    def __init__(self, model_config: ModelConfig):
        super().__init__()
        self.transformer = GPT2Model(model_config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        return self.transformer.wte.logits(hidden, gather)  # the head is tied to the token embeddings

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def renamed():  # checkpoints saved from GPT2Model have no "transformer." prefix
            for name, tensor in weights:
                yield (name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"), tensor

        def skip(name: str) -> bool:  # the tied head, and the causal-mask buffers of old checkpoints
            return name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias"))
        load_params(self, renamed(), skip=skip)
