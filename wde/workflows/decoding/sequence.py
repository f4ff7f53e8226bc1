"""The state of a request while it decodes: one SequenceGroup per request, one Sequence per completion."""
import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from wde.core.outputs import TokenLogprobs
from wde.core.request import Request
from wde.core.sampling.sampling_params import SamplingParams
from wde.core.tokenizer import IncrementalDecoder


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SequenceGroup:
    request: Request
    prompt_token_ids: list[int]
    sequences: list["Sequence"] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens the prefix cache supplied (first admission of each sequence)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def is_finished(self) -> bool:
        for seq in self.sequences:  # a loop, not all(...): asked of every request every step
            if seq.status is not SequenceStatus.FINISHED:
                return False
        return True


@dataclass(eq=False)
class Sequence:
    group: SequenceGroup
    index: int  # which of the request's n completions this is
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    max_output_tokens: int  # max_tokens, cut to what max_model_len and the KV cache allow
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_pending_tokens: int = 0  # sampled by a scheduled step, not yet in token_ids (async scheduling: in flight)
    sample_row: int = -1  # its row among the samples of the last step that sampled it
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks (prefix caching)
    num_freed_blocks: int = 0  # the first blocks of its table, given back: wholly before its layers' window
    # a model whose layers mix windows: the block tables of its KV layer groups after the first, and how many
    # of each one's first blocks went back (wde/core/kv_cache/layer_groups.py)
    group_tables: list[list[int]] = field(default_factory=list)
    group_freed_blocks: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    decoder: IncrementalDecoder | None = None
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # [None, then one per prompt token] when asked
    generator: torch.Generator | None = None  # the request's own, when it has a seed
    grammar: Any = None  # its structured output's matcher, advanced by the OutputProcessor with each token
    # how much of the output the last RequestOutput carried (for delta outputs)
    num_emitted_tokens: int = 0
    num_emitted_chars: int = 0
    finish_emitted: bool = False  # its finish went out in an output (a stream leaves it out of later ones)

    @property
    def request(self) -> Request:
        return self.group.request

    @property
    def params(self) -> SamplingParams:
        return self.group.request.params

    @property
    def num_tokens(self) -> int:
        """Known tokens and the one a scheduled step is sampling."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status, self.finish_reason, self.stop_reason = SequenceStatus.FINISHED, reason, stop_reason
