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

    def __call__(self, hidden: torch.Tensor, meta: PoolingMetadata) -> torch.Tensor:
        logits = self.logits(hidden, meta)
        return with_activation(torch.softmax(logits, dim=-1), logits, meta)


def with_activation(activated: torch.Tensor, raw: torch.Tensor, meta: PoolingMetadata) -> torch.Tensor:
    """Each input's row of `activated`, or of `raw` where its PoolingParams turn the activation off."""
    if all(params.activation for params in meta.params):
        return activated
    wanted = torch.tensor([params.activation for params in meta.params], device=raw.device)
    return torch.where(wanted.view(-1, *[1] * (raw.dim() - 1)), activated, raw)
