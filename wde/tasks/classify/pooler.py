"""Classification: the model's head on each input's first token, as probabilities (softmax) or logits."""
import torch

from wde.core import interfaces
from wde.workflows.prefill_only.model_pre_processor import PoolingMetadata
from wde.workflows.prefill_only.pooling import pool


class ClassificationPooler(interfaces.Pooler):
    def __init__(self, config, model):
        super().__init__(config, model)
        self.model = model

    def logits(self, hidden: torch.Tensor, meta: PoolingMetadata) -> torch.Tensor:
        """[inputs, labels] float32 from the classifier head over the first ([CLS] / <s>) token."""
        return self.model.classify(pool(hidden, meta, "cls").to(hidden.dtype)).float()

    def __call__(self, hidden: torch.Tensor, meta: PoolingMetadata) -> list[torch.Tensor]:
        logits = self.logits(hidden, meta)
        probs = torch.softmax(logits, dim=-1)
        return [p if params.activation else raw for p, raw, params in zip(probs.cpu(), logits.cpu(), meta.params)]
