"""Checks a prefill-only request when it is submitted (an input, or a (query, document) pair to score)."""
from typing import Any

from wde.core import interfaces
from wde.core.inputs import coerce_params, parse_prompt
from wde.core.pooling_params import PoolingParams
from wde.core.request import Request
from wde.workflows.prefill_only.pooling import sentence_transformers_pooling


class PrefillOnlyInputProcessor(interfaces.InputProcessor):
    @classmethod
    def from_engine(cls, engine) -> "PrefillOnlyInputProcessor":
        return cls(engine.config, engine.workflow.task)

    def __init__(self, config, task: str):
        super().__init__(config)
        self.task = task
        # read once: attribute access on a transformers config object is slow, and this runs per request
        self.vocab_size, hidden_size = config.model.vocab_size, config.model.hf_config.hidden_size
        pooling = sentence_transformers_pooling(config.model.path, hidden_size) if task == "embed" else None
        self.width = pooling.width(hidden_size) if pooling else hidden_size  # an embedding's, after its Dense

    def __call__(self, request_id: str, prompt: Any, params: Any, arrival_time: float) -> Request:
        params = coerce_params(params, PoolingParams)
        if params.dimensions is not None and params.dimensions > self.width:
            raise ValueError(f"dimensions={params.dimensions} is more than the model's {self.width}")
        vocab_size = self.vocab_size
        if self.task == "score":
            if not isinstance(prompt, tuple) or len(prompt) != 2:
                raise TypeError("a scoring request takes a (query, document) tuple")
            pair = tuple(text if text is not None else ids
                         for text, ids in (parse_prompt(part, vocab_size) for part in prompt))
            return Request(request_id, pair, None, params, arrival_time)
        text, token_ids = parse_prompt(prompt, vocab_size)
        return Request(request_id, text, token_ids, params, arrival_time)
