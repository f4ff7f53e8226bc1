"""Embeddings: pool each input's hidden states, through the dense layers its sentence-transformers files name,
cut to `dimensions`, L2-normalize."""
from dataclasses import replace

import torch
import torch.nn.functional as F

from wde.core import interfaces
from wde.workflows.prefill_only.model_pre_processor import PoolingMetadata
from wde.workflows.prefill_only.pooling import SentenceTransformersPooling, pool, sentence_transformers_pooling


class EmbeddingPooler(interfaces.Pooler):
    """As the model folder's sentence-transformers files say; otherwise the model family's own pooling
    (BERT: [CLS], decoders: the last token), normalized."""

    def __init__(self, config, model):
        super().__init__(config, model)
        pooling = (sentence_transformers_pooling(config.model.path, config.model.hf_config.hidden_size)
                   or SentenceTransformersPooling(model.pooling, True))
        self.method, self.normalize = pooling.method, pooling.normalize
        device = next(model.parameters()).device
        self.dense = [replace(layer, weight=layer.weight.to(device),
                              bias=None if layer.bias is None else layer.bias.to(device)) for layer in pooling.dense]
        if getattr(model, "pooling", None) == "last" and self.method != "last":
            raise ValueError(f"a decoder embedder pools its last token, not {self.method!r} (its earlier tokens "
                             "may come from the prefix cache, with no hidden state)")

    def __call__(self, hidden: torch.Tensor, meta: PoolingMetadata) -> torch.Tensor | list[torch.Tensor]:
        vectors = pool(hidden, meta, self.method)
        for layer in self.dense:
            vectors = layer(vectors)
        settings = [(p.dimensions, self.normalize if p.normalize is None else p.normalize) for p in meta.params]
        if len(set(settings)) == 1:  # the usual case: one setting for the whole step, one [inputs, dims] tensor
            dimensions, normalize = settings[0]
            vectors = vectors[:, :dimensions]
            return F.normalize(vectors, dim=1) if normalize else vectors
        return [F.normalize(v[:dimensions], dim=0) if normalize else v[:dimensions]
                for v, (dimensions, normalize) in zip(vectors, settings)]
