"""The state of a prefill-only request once tokenized: one input, computed in one step."""
from array import array
from dataclasses import dataclass, field

from wde.core.request import Request


@dataclass(eq=False)
class PrefillOnlySequence:
    request: Request
    prompt_token_ids: list[int]  # as tokenized (or given), for the output
    token_ids: array  # the same, as machine ints: a step's batch is built by concatenating these buffers
    token_type_ids: list[int] | None = None  # segment ids of a (query, document) pair, for BERT-like encoders
    num_computed_tokens: int = 0  # decoders with prefix caching: tokens whose K/V the cache already held
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_freed_blocks: int = 0  # never set: one step computes a whole input (the KVCacheManager's protocol)
    group_tables: list[list[int]] = field(default_factory=list)  # never set: its worker keeps one KV layer group
    group_freed_blocks: list[int] = field(default_factory=list)
    aborted: bool = False  # by the scheduler, when the request is aborted while its step runs: no output then

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def is_finished(self) -> bool:
        """Ended before its step's results were read: only an abort does that (a computed input ends as its
        output is made, and is then out of every step)."""
        return self.aborted

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)
