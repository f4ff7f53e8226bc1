"""BERT encoders: BertModel (embeddings) and BertForSequenceClassification (cross-encoders, classifiers).

Unpadded: the whole batch is one flat run of tokens, each sequence attending only to itself.
"""
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from wde.core.attention.layer import EncoderAttention
from wde.core.config import ModelConfig
from wde.core.layers.linear import Linear, MergedColumnParallelLinear
from wde.core.loader.model_loader import load_params

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class BertEmbeddings(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
                      + self.position_embeddings(positions))
        return self.LayerNorm(embeddings)


class BertSelfAttention(nn.Module):
    def __init__(self, model_config: ModelConfig):
        super().__init__()
        hidden = model_config.hf_config.hidden_size
        self.qkv_proj = MergedColumnParallelLinear(hidden, {"q": hidden, "k": hidden, "v": hidden}, bias=True)
        self.attn = EncoderAttention(model_config.num_heads, model_config.num_heads, model_config.head_dim,
                                     scale=model_config.head_dim ** -0.5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).chunk(3, dim=-1)
        return self.attn(q, k, v)


class BertDenseOutput(nn.Module):
    """dense -> LayerNorm(+ residual), the tail of both halves of a BERT layer."""

    def __init__(self, input_size: int, config: PretrainedConfig):
        super().__init__()
        self.dense = Linear(input_size, config.hidden_size, bias=True)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, model_config: ModelConfig):
        super().__init__()
        self.self = BertSelfAttention(model_config)
        self.output = BertDenseOutput(model_config.hf_config.hidden_size, model_config.hf_config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, model_config: ModelConfig):
        super().__init__()
        config = model_config.hf_config
        self.attention = BertAttention(model_config)
        self.intermediate = BertIntermediate(config)
        self.output = BertDenseOutput(config.intermediate_size, config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, model_config: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(model_config)
                                   for _ in range(model_config.hf_config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden)
        return hidden


class BertModel(nn.Module):
    """The encoder alone: hidden states of every token ([CLS] first), for embeddings."""

    pooling = "cls"  # the model family's pooling when the folder has no sentence-transformers config
    position_offset = 0  # XLM-RoBERTa numbers positions from padding_idx + 1
    checkpoint_prefix = "bert."  # task models store the encoder under this name
    stacked_params = (("qkv_proj", "query", "q"), ("qkv_proj", "key", "k"), ("qkv_proj", "value", "v"))

    def __init__(self, model_config: ModelConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(model_config.hf_config)
        self.encoder = BertEncoder(model_config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(self.embeddings(input_ids, positions + self.position_offset, token_type_ids))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def renamed():
            for name, tensor in weights:
                yield name.removeprefix(self.checkpoint_prefix), tensor
        load_params(self, renamed(), self.stacked_params, skip=self.skip_weight)

    @staticmethod
    def skip_weight(name: str) -> bool:
        # a base model's checkpoint may also hold BERT's own pooler and classifier, which embeddings do not use
        return name.endswith("position_ids") or name.startswith(("pooler.", "classifier.", "cls.", "lm_head."))


class BertForSequenceClassification(nn.Module):
    """BERT with its pooler (dense + tanh on [CLS]) and a linear classifier: num_labels logits per input."""

    pooling = "cls"
    encoder_class = BertModel

    def __init__(self, model_config: ModelConfig):
        super().__init__()
        config = model_config.hf_config
        self.bert = self.encoder_class(model_config)
        self.pooler = nn.Sequential()
        self.pooler.add_module("dense", Linear(config.hidden_size, config.hidden_size, bias=True))
        self.classifier = Linear(config.hidden_size, config.num_labels, bias=True)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.bert(input_ids, positions, token_type_ids)

    def classify(self, first_token_hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(first_token_hidden)))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def renamed():  # transformers keeps BERT's pooler inside the encoder ("bert.pooler."); here it is beside it
            for name, tensor in weights:
                yield name.replace("bert.pooler.", "pooler."), tensor
        load_params(self, renamed(), self.encoder_class.stacked_params, skip=lambda n: n.endswith("position_ids"))
