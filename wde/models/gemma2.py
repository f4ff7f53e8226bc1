"""Gemma 2 and Gemma 3 (text). Gemma 2: Llama's attention and gated MLP with Gemma's changes: embeddings
scaled by sqrt(hidden_size), RMSNorms that scale by (1 + weight), a norm after attention and one on each side
of the MLP, GeGLU (gelu, tanh approximation), queries scaled by query_pre_attn_scalar, attention scores and
final logits soft-capped (cap * tanh(x / cap)), and local layers (a sliding window) alternating with global
ones. Gemma 3: no caps, an RMSNorm (1 + weight) over each head of q and k, five local layers to a global one,
each kind with its RoPE."""
import copy
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from wde.core.config import ModelConfig
from wde.core.layers.embedding import VocabParallelEmbedding
from wde.core.layers.mlp import GatedMLP
from wde.core.layers.norm import GemmaRMSNorm
from wde.core.layers.rotary import RotaryEmbedding
from wde.models.llama import LlamaAttention, LlamaForCausalLM


def layer_windows(config: PretrainedConfig) -> list[int | None]:
    """Each layer's attention window: the config's sliding_window on "sliding_attention" layers, else none."""
    return [config.sliding_window if kind == "sliding_attention" else None for kind in config.layer_types]


def rope_config(config: PretrainedConfig, layer_type: str) -> PretrainedConfig:
    """The config whose RoPE a layer of `layer_type` uses: Gemma 3 keys rope_parameters by layer type (a local
    base for sliding layers, a global one, maybe scaled, for full ones); Gemma 2 has one for all."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type not in params:
        return config
    view = copy.copy(config)
    view.rope_parameters = params[layer_type]
    return view


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, model_config: ModelConfig, rotary_emb: RotaryEmbedding, attention: dict, mlp: nn.Module):
        super().__init__()
        size, eps = model_config.hf_config.hidden_size, model_config.hf_config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.self_attn = LlamaAttention(model_config, rotary_emb, **attention)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.mlp = mlp
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None):
        """The residual add before each sublayer is folded into the norm that follows it (as in Llama's)."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2Model(nn.Module):
    def __init__(self, model_config: ModelConfig, attention: dict, feed_forward: Callable[[int], nn.Module]):
        super().__init__()
        config = model_config.hf_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size ** 0.5
        rotary_embs = {kind: RotaryEmbedding(rope_config(config, kind), model_config.head_dim,
                                             model_config.max_model_len) for kind in set(config.layer_types)}
        self.layers = nn.ModuleList(
            Gemma2DecoderLayer(model_config, rotary_embs[kind], {**attention, "sliding_window": window},
                               feed_forward(i))
            for i, (kind, window) in enumerate(zip(config.layer_types, layer_windows(config))))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        # the scale rounded to the activations' type first, as transformers does
        hidden, residual = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return self.norm(hidden, residual)[0]


class Gemma2ForCausalLM(LlamaForCausalLM):
    model_class = Gemma2Model

    def __init__(self, model_config: ModelConfig):
        super().__init__(model_config)
        self.final_softcap = getattr(model_config.hf_config, "final_logit_softcapping", None)

    @staticmethod
    def attention_options(config: PretrainedConfig) -> dict:
        bias = getattr(config, "attention_bias", False)
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": False, "scale": config.query_pre_attn_scalar ** -0.5,
                "logit_softcap": getattr(config, "attn_logit_softcapping", None)}

    @staticmethod
    def feed_forward(config: PretrainedConfig, layer_index: int) -> nn.Module:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_activation)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Soft-capped elementwise, so a rank's slice is capped as the whole would be (and the argmax kept)."""
        logits = super().compute_logits(hidden, gather)
        if self.final_softcap is None:
            return logits
        return self.final_softcap * torch.tanh(logits / self.final_softcap)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    @staticmethod
    def attention_options(config: PretrainedConfig) -> dict:
        return {**Gemma2ForCausalLM.attention_options(config), "qk_norm": True, "norm_class": GemmaRMSNorm}


class Gemma3TextEncoder(Gemma3ForCausalLM):
    """EmbeddingGemma: a Gemma 3 whose attention runs both ways (use_bidirectional_attention), served as an
    encoder: its global layers read the whole input, its local ones the positions less than sliding_window away
    on either side (as transformers masks them); pooled as its sentence-transformers files say (the mean, then
    two dense layers)."""

    pooling = "mean"

    def __init__(self, model_config: ModelConfig):
        if not getattr(model_config.hf_config, "use_bidirectional_attention", False):
            raise ValueError("a Gemma3TextModel without use_bidirectional_attention is a causal decoder: serve it "
                             "as Gemma3ForCausalLM (architectures in config.json) with task='embed'")
        super().__init__(model_config)

    @staticmethod
    def attention_options(config: PretrainedConfig) -> dict:
        return {**Gemma3ForCausalLM.attention_options(config), "bidirectional": True}

    def load_weights(self, weights) -> None:
        """A Gemma3TextModel checkpoint names its tensors without the "model." of the decoder's."""
        super().load_weights((name if name.startswith("model.") else f"model.{name}", tensor)
                             for name, tensor in weights)
