"""Embeddings: pool each input's hidden states, cut to `dimensions`, L2-normalize."""
import torch
import torch.nn.functional as F

from wde.core import interfaces
from wde.workflows.prefill_only.model_pre_processor import PoolingMetadata
from wde.workflows.prefill_only.pooling import pool, sentence_transformers_pooling


class EmbeddingPooler(interfaces.Pooler):
    """As the model folder's sentence-transformers files say; otherwise the model family's own pooling
    (BERT: [CLS], decoders: the last token), normalized."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.method, self.normalize = sentence_transformers_pooling(config.model.path) or (model.pooling, True)
        if getattr(model, "pooling", None) == "last" and self.method != "last":
            raise ValueError(f"a decoder embedder pools its last token, not {self.method!r} (its earlier tokens "
                             "may come from the prefix cache, with no hidden state)")

    def __call__(self, hidden: torch.Tensor, meta: PoolingMetadata) -> torch.Tensor | list[torch.Tensor]:
        vectors = pool(hidden, meta, self.method)
        settings = [(p.dimensions, self.normalize if p.normalize is None else p.normalize) for p in meta.params]
        if len(set(settings)) == 1:  # the usual case: one setting for the whole step, one [inputs, dims] tensor
            dimensions, normalize = settings[0]
            vectors = vectors[:, :dimensions]
            return F.normalize(vectors, dim=1) if normalize else vectors
        return [F.normalize(v[:dimensions], dim=0) if normalize else v[:dimensions]
                for v, (dimensions, normalize) in zip(vectors, settings)]
