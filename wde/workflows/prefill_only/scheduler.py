"""Packs whole inputs into a step, first come first served, within max_num_batched_tokens and max_num_seqs.

Each input is computed in one step and then finished, so nothing waits mid-way and nothing is preempted.
Decoder models (with a KV cache) first look up the start of each input in the prefix cache: an instruction or
a query shared by many inputs is computed once, and each input computes only what follows it.
"""
from collections import deque
from dataclasses import dataclass
from typing import Callable

from wde.core import interfaces
from wde.core.request import Request
from wde.core.engine.scheduler_output import SchedulerOutput
from wde.core.engine.stats import SchedulerStats
from wde.workflows.prefill_only.sequence import PrefillOnlySequence


@dataclass
class ScheduledInput:
    seq: PrefillOnlySequence
    num_cached_tokens: int  # tokens the prefix cache supplied; the step computes the rest

    def written_blocks(self, block_size: int) -> list[int]:
        return self.seq.block_table[self.num_cached_tokens // block_size:]


@dataclass
class PrefillOnlySchedulerOutput(SchedulerOutput[ScheduledInput]):
    pass


class PrefillOnlyScheduler(interfaces.Scheduler):
    @classmethod
    def from_engine(cls, engine) -> "PrefillOnlyScheduler":
        return cls(engine.config, engine.kv_cache_manager, engine.process_request)

    def __init__(self, config, kv_cache_manager, process_request: Callable[[Request], PrefillOnlySequence | None]):
        super().__init__(config)
        self.kv_cache_manager = kv_cache_manager
        self.uses_kv_cache = kv_cache_manager.num_blocks > 0
        self.process_request = process_request  # tokenizes; None when the request failed (the engine reports it)
        self.max_num_seqs = config.args.max_num_seqs
        self.max_num_batched_tokens = config.args.max_num_batched_tokens
        self.waiting: deque[Request | PrefillOnlySequence] = deque()  # requests are tokenized when they come up
        self.request_ids: set[str] = set()
        self.in_step: dict[str, PrefillOnlySequence] = {}  # scheduled, holding KV blocks until their step ends
        self.num_prompt_tokens = 0

    def add_request(self, request: Request) -> None:
        if request.request_id in self.request_ids:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.request_ids.add(request.request_id)
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> bool:
        """O(1): the request leaves the live set now, and the queue when it reaches the front; if its step was
        scheduled, its KV blocks are freed now."""
        if request_id not in self.request_ids:
            return False
        self.request_ids.remove(request_id)
        seq = self.in_step.pop(request_id, None)
        if seq is not None and self.uses_kv_cache:
            self.kv_cache_manager.free(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.request_ids)

    @property
    def num_waiting(self) -> int:
        return len(self.request_ids)

    def schedule(self) -> PrefillOnlySchedulerOutput:
        output = PrefillOnlySchedulerOutput()
        budget = self.max_num_batched_tokens
        while self.waiting and len(output.scheduled) < self.max_num_seqs:
            seq = self._tokenized_head()
            if seq is None:
                continue
            cached = self.kv_cache_manager.allocate_cached_prefix(seq) if self.uses_kv_cache else 0
            new_tokens = seq.num_tokens - cached
            fits = new_tokens <= budget and (not self.uses_kv_cache
                                             or self.kv_cache_manager.allocate_slots(seq, new_tokens))
            if not fits:
                if self.uses_kv_cache:  # give the prefix back; the input waits for the next step
                    self.kv_cache_manager.free(seq)
                    seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            if self.kv_cache_manager.enable_prefix_caching:
                self.kv_cache_manager.count_prefix_lookup(seq.num_tokens, cached)
            output.scheduled.append(ScheduledInput(seq, cached))
            self.in_step[seq.request_id] = seq
            budget -= new_tokens
            self.num_prompt_tokens += new_tokens
        return output

    def _tokenized_head(self) -> PrefillOnlySequence | None:
        head = self.waiting[0]
        if head.request_id not in self.request_ids:  # aborted while it waited
            self.waiting.popleft()
            return None
        if isinstance(head, PrefillOnlySequence):
            return head
        seq = self.process_request(head)
        if seq is None:
            self.waiting.popleft()
            self.request_ids.discard(head.request_id)
            return None
        self.waiting[0] = seq
        return seq

    def free_finished(self, output: PrefillOnlySchedulerOutput) -> None:
        for item in output.scheduled:  # every input finishes in its step
            if self.in_step.pop(item.seq.request_id, None) is not None and self.uses_kv_cache:
                self.kv_cache_manager.free(item.seq)  # full blocks stay findable in the prefix cache
            self.request_ids.discard(item.seq.request_id)

    def get_stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        return SchedulerStats(num_waiting=self.num_waiting, kv_blocks_used=kv.num_blocks - kv.num_free_blocks,
                              kv_blocks_total=kv.num_blocks, prefix_cache_hit_rate=kv.prefix_cache_hit_rate,
                              num_prompt_tokens=self.num_prompt_tokens)
