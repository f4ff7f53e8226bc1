"""A request as the InputProcessor wraps it: checked, not yet tokenized."""
from dataclasses import dataclass
from typing import Any


@dataclass
class Request:
    request_id: str
    prompt: str | None  # the text, when the user gave text
    prompt_token_ids: list[int] | None  # the ids, when the user gave ids (else filled in at schedule time)
    params: Any  # SamplingParams, PoolingParams, ... as the workflow expects
    arrival_time: float
    grammar: Any = None  # decoding with structured outputs: its grammar, compiling (a Future), from the InputProcessor
