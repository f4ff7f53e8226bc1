"""What the engine returns for each request, shaped as vLLM's RequestOutput so existing code reads it."""
from dataclasses import dataclass

import torch


# slots: a streaming engine makes one RequestOutput and CompletionOutput per request every step
@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


# per generated token: token id -> its Logprob (the sampled token and the top-k)
TokenLogprobs = dict[int, Logprob]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    stop_reason: int | str | None = None  # the stop token id that ended it, when one did

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None  # why the request failed, when finish_reason is "error"
    internal_error: bool = False  # the failure was the engine's, not caused by what the request asked
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # None for the first prompt token
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass
class EmbeddingOutput:
    data: torch.Tensor  # [dimensions] float32 on the host

    @property
    def embedding(self) -> list[float]:
        return self.data.tolist()  # made on demand: a large batch need not build millions of Python floats


@dataclass
class ScoringOutput:
    score: float


@dataclass
class ClassificationOutput:
    data: torch.Tensor  # [classes] float32: probabilities, or logits with PoolingParams(activation=False)

    @property
    def probs(self) -> list[float]:
        return self.data.tolist()

    @property
    def num_classes(self) -> int:
        return self.data.shape[0]


@dataclass
class PoolingRequestOutput:
    """The result of a prefill-only request: `outputs` is an EmbeddingOutput, ScoringOutput or
    ClassificationOutput (None when the request failed, with `error` saying why)."""

    request_id: str
    outputs: EmbeddingOutput | ScoringOutput | ClassificationOutput | None
    prompt_token_ids: list[int]
    finished: bool = True
    error: str | None = None
    internal_error: bool = False  # the failure was the engine's, not caused by what the request asked
    num_cached_tokens: int = 0  # tokens whose KV came from the prefix cache (decoder models)


# vLLM's names for the three kinds
EmbeddingRequestOutput = ScoringRequestOutput = ClassificationRequestOutput = PoolingRequestOutput
