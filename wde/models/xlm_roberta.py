"""XLM-RoBERTa: BERT's encoder with positions numbered from padding_idx + 1, one token type, and a
classification head of dense + tanh + out_proj on the <s> token."""
import torch
from torch import nn

from wde.core.config import ModelConfig
from wde.core.layers.linear import Linear
from wde.models.bert import BertForSequenceClassification, BertModel


class XLMRobertaModel(BertModel):
    checkpoint_prefix = "roberta."

    def __init__(self, model_config: ModelConfig):
        super().__init__(model_config)
        # transformers numbers the positions of an unpadded sequence padding_idx + 1, padding_idx + 2, ...
        self.position_offset = model_config.hf_config.pad_token_id + 1


class XLMRobertaClassificationHead(nn.Module):
    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__()
        self.dense = Linear(hidden_size, hidden_size, bias=True)
        self.out_proj = Linear(hidden_size, num_labels, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(x)))


class XLMRobertaForSequenceClassification(BertForSequenceClassification):
    encoder_class = XLMRobertaModel

    def __init__(self, model_config: ModelConfig):
        nn.Module.__init__(self)
        config = model_config.hf_config
        self.roberta = XLMRobertaModel(model_config)
        self.classifier = XLMRobertaClassificationHead(config.hidden_size, config.num_labels)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.roberta(input_ids, positions, token_type_ids)

    def classify(self, first_token_hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(first_token_hidden)
