"""The Llama decoder, which Qwen2 and Qwen3 extend with a few switches (see qwen2.py, qwen3.py)."""
from typing import Callable, Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from wde.core.attention.layer import Attention, EncoderAttention
from wde.core.config import ModelConfig
from wde.core.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from wde.core.layers.linear import QKVParallelLinear, RowParallelLinear
from wde.core.layers.mlp import GatedMLP
from wde.core.layers.moe import expert_param
from wde.core.layers.norm import RMSNorm
from wde.core.layers.rotary import RotaryEmbedding, Rotation
from wde.core.loader.model_loader import load_params


class LlamaAttention(nn.Module):
    def __init__(self, model_config: ModelConfig, rotary_emb: RotaryEmbedding, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool, sliding_window: int | None = None, scale: float | None = None,
                 logit_softcap: float | None = None, norm_class: type[RMSNorm] = RMSNorm,
                 bidirectional: bool = False):
        super().__init__()
        config = model_config.hf_config
        heads, kv_heads, head_dim = model_config.num_heads, model_config.num_kv_heads, model_config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, heads, kv_heads, bias=qkv_bias)
        (first_q, local_heads), (_, local_kv_heads) = self.qkv_proj.q_heads, self.qkv_proj.kv_heads  # this rank's
        self.q_size, self.kv_size = local_heads * head_dim, local_kv_heads * head_dim
        self.o_proj = RowParallelLinear(heads * head_dim, config.hidden_size, bias=o_bias,
                                        input_shard=(first_q * head_dim, self.q_size))
        # Qwen3 normalizes each head of q and k before the rotation
        self.q_norm = norm_class(head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = norm_class(head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary_emb = rotary_emb
        # bidirectional (EmbeddingGemma): every token sees the whole input, with no KV cache
        attention_class = EncoderAttention if bidirectional else Attention
        self.attn = attention_class(local_heads, local_kv_heads, head_dim, scale=scale or head_dim ** -0.5,
                                    sliding_window=sliding_window, logit_softcap=logit_softcap)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.o_proj(self.attn(q, k, v, Rotation(self.rotary_emb, positions, self.q_norm, self.k_norm)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, model_config: ModelConfig, rotary_emb: RotaryEmbedding, attention: dict, mlp: nn.Module):
        super().__init__()
        config = model_config.hf_config
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(model_config, rotary_emb, **attention)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, model_config: ModelConfig, attention: dict, feed_forward: Callable[[int], nn.Module]):
        super().__init__()
        config = model_config.hf_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # one table of rotations for all layers: it holds max_model_len rows
        rotary_emb = RotaryEmbedding(config, model_config.head_dim, model_config.max_model_len)
        self.layers = nn.ModuleList(LlamaDecoderLayer(model_config, rotary_emb, attention, feed_forward(index))
                                    for index in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    supports_tensor_parallel = True
    pooling = "last"  # as an embedder (gte-Qwen2, Qwen3-Embedding): the last token sees the whole input
    # checkpoint parts that load into one merged parameter: (merged, part, shard id)
    stacked_params = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
                      ("gate_up_proj", "gate_proj", "gate"), ("gate_up_proj", "up_proj", "up"))
    one_window_for_all_layers = False  # the config's sliding_window, when set, is every layer's (Mistral)
    model_class = LlamaModel  # takes (model_config, attention options, feed_forward(layer index))

    def __init__(self, model_config: ModelConfig):
        super().__init__()
        config = model_config.hf_config
        if getattr(config, "use_sliding_window", False):
            raise ValueError("use_sliding_window (Qwen2's windows on its upper layers) is not supported")
        attention = self.attention_options(config)
        if self.one_window_for_all_layers:
            attention["sliding_window"] = getattr(config, "sliding_window", None)
        self.model = self.model_class(model_config, attention, lambda index: self.feed_forward(config, index))
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)

    @staticmethod
    def attention_options(config: PretrainedConfig) -> dict:
        bias = getattr(config, "attention_bias", False)
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": False}

    @staticmethod
    def feed_forward(config: PretrainedConfig, layer_index: int) -> nn.Module:
        """Layer `layer_index`'s MLP (mixture-of-experts models choose per layer)."""
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                        bias=getattr(config, "mlp_bias", False))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat batch of tokens -> final hidden states [num_tokens, hidden_size]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Logits of the whole vocabulary; gather=False: this tensor-parallel rank's slice of them."""
        return self.lm_head.logits(hidden, gather)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def skip(name: str) -> bool:
            return "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name == "lm_head.weight")
        load_params(self, weights, self.stacked_params, skip, expert_param)
