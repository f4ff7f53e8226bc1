"""What the engine returns for each request, shaped as vLLM's RequestOutput so existing code reads it."""
from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


# per generated token: token id -> its Logprob (the sampled token and the top-k)
TokenLogprobs = dict[int, Logprob]


@dataclass
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


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None  # why the request failed, when finish_reason is "error"
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # None for the first prompt token
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
