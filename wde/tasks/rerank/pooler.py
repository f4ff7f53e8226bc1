"""Relevance scores of (query, document) inputs: a cross-encoder's head, or a decoder's yes / no tokens."""
import torch

from wde.core import interfaces
from wde.tasks.classify.pooler import ClassificationPooler, with_activation
from wde.workflows.prefill_only.model_pre_processor import PoolingMetadata
from wde.workflows.prefill_only.pooling import pool


def as_scores(logits: torch.Tensor, meta: PoolingMetadata) -> torch.Tensor:
    """One score per input: sigmoid of a single logit, or the probability of the last of several labels."""
    probs = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, dim=-1)[:, -1]
    raw = logits[:, 0] if logits.shape[1] == 1 else logits[:, -1] - logits[:, 0]
    return with_activation(probs, raw, meta)


class CrossEncoderPooler(ClassificationPooler):
    """BERT / XLM-RoBERTa rerankers: the classifier over [CLS] of "query [SEP] document"."""

    def __call__(self, hidden: torch.Tensor, meta: PoolingMetadata) -> torch.Tensor:
        return as_scores(self.logits(hidden, meta), meta)


class YesNoPooler(interfaces.Pooler):
    """Decoder rerankers (as Qwen3-Reranker): the LM head at the last token, P(yes) against P(no).

    The two words are a class attribute: a reranker trained on others subclasses this with its own.
    """

    tokens = ("yes", "no")

    @classmethod
    def from_worker(cls, config, model, components: dict[str, type]) -> "YesNoPooler":
        return cls(config, model, components["Tokenizer"](config))

    def __init__(self, config, model, tokenizer: interfaces.Tokenizer):
        super().__init__(config, model)
        self.model = model
        ids = [tokenizer.encode(word, add_special_tokens=False) for word in self.tokens]
        if any(len(token_ids) != 1 for token_ids in ids) or ids[0] == ids[1]:  # both <unk>: scores all 0.5
            raise ValueError(f"the reranker's words {self.tokens} must be one token each, and two tokens; "
                             f"they are {ids}")
        self.token_ids = [token_ids[0] for token_ids in ids]

    def __call__(self, hidden: torch.Tensor, meta: PoolingMetadata) -> torch.Tensor:
        logits = self.model.compute_logits(pool(hidden, meta, "last").to(hidden.dtype))[:, self.token_ids].float()
        return as_scores(logits.flip(1), meta)  # [no, yes]: the score is the probability of the last, "yes"
