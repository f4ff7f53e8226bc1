"""Checks a decoding request when it is submitted; tokenization waits for the scheduler."""
from typing import Any

from wde.core import interfaces
from wde.core.inputs import coerce_params, parse_prompt
from wde.core.request import Request
from wde.core.sampling.sampling_params import SamplingParams


class DecodingInputProcessor(interfaces.InputProcessor):
    @classmethod
    def from_engine(cls, engine) -> "DecodingInputProcessor":
        return cls(engine.config, engine.structured_outputs)

    def __init__(self, config, structured_outputs: interfaces.StructuredOutputBackend | None = None):
        super().__init__(config)
        self.structured_outputs = structured_outputs
        # read once: attribute access on a transformers config object is slow, and this runs per request
        self.vocab_size, self.max_model_len = config.model.vocab_size, config.model.max_model_len

    def __call__(self, request_id: str, prompt: Any, params: Any, arrival_time: float) -> Request:
        params = coerce_params(params, SamplingParams)
        vocab_size = self.vocab_size
        bad_stops = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
        if bad_stops:
            raise ValueError(f"stop_token_ids {bad_stops} are outside the vocabulary [0, {vocab_size})")
        text, token_ids = parse_prompt(prompt, vocab_size)
        if token_ids is not None:
            check_prompt_fits(len(token_ids), self.max_model_len)
        request = Request(request_id, text, token_ids, params, arrival_time)
        if params.structured_outputs is not None:
            if self.structured_outputs is None:
                raise ValueError("structured_outputs: this workflow has no StructuredOutputs slot")
            request.grammar = self.structured_outputs.compile(params.structured_outputs)
        return request


def check_prompt_fits(prompt_len: int, max_model_len: int) -> None:
    """The one rule of a decoding prompt's length, at submission (token ids) and once tokenized (text): it must
    leave room for an output token."""
    if prompt_len >= max_model_len:
        raise ValueError(f"the prompt has {prompt_len} tokens; it must be shorter than max_model_len="
                         f"{max_model_len} to leave room for output")
