"""Packs whole inputs into a step, first come first served, within max_num_batched_tokens and max_num_seqs.

Each input is computed in one step and then finished, so nothing waits mid-way and nothing is preempted.
Decoder models (with a KV cache) first look up the start of each input in the prefix cache: an instruction or
a query shared by many inputs is computed once, and each input computes only what follows it.
"""
from collections import deque
from dataclasses import dataclass
from typing import Callable

from wde.core.engine.budgeted_scheduler import BudgetedScheduler
from wde.core.engine.scheduler_output import SchedulerOutput
from wde.core.engine.stats import SchedulerStats
from wde.core.request import Request
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


class PrefillOnlyScheduler(BudgetedScheduler[PrefillOnlySchedulerOutput]):
    @classmethod
    def from_engine(cls, engine) -> "PrefillOnlyScheduler":
        return cls(engine.config, engine.kv_cache_manager, engine.process_request, engine.workflow.causal)

    def __init__(self, config, kv_cache_manager, process_request: Callable[[Request], PrefillOnlySequence | None],
                 causal: bool):
        super().__init__(config, kv_cache_manager, process_request)
        self.uses_kv_cache = causal  # a decoder's inputs hold KV blocks (and may share cached prefixes)
        self._check_host_tier(config.args)
        self.waiting: deque[Request | PrefillOnlySequence] = deque()  # requests are tokenized when they come up
        self.requests: dict[str, Request] = {}  # the live request of each id
        self.in_step: dict[str, PrefillOnlySequence] = {}  # scheduled, holding KV blocks until their step ends
        self.num_prompt_tokens = 0

    def _check_host_tier(self, args) -> None:
        """Nothing here is preempted, so a host tier can only hold a decoder's prefix-cache blocks."""
        if not args.has_host_tier:
            return
        if not self.uses_kv_cache:
            raise ValueError("kv_offload_gib / num_kv_offload_blocks: this encoder keeps no KV cache for a host tier "
                             "to hold")
        if not args.enable_prefix_caching:
            raise ValueError("kv_offload_gib / num_kv_offload_blocks: a prefill-only workflow never preempts, so its "
                             "host tier holds prefix-cache blocks only: set enable_prefix_caching=True")

    def add_request(self, request: Request) -> None:
        self.check_new_id(request, self.requests)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> bool:
        """O(1): the request leaves the live set now, and the queue when it reaches the front; if its step was
        scheduled, its KV blocks are freed now."""
        if self.requests.pop(request_id, None) is None:
            return False
        seq = self.in_step.pop(request_id, None)
        if seq is not None:
            seq.aborted = True
            if self.uses_kv_cache:
                self.kv_cache_manager.free(seq)
        return True

    def _holds(self, request: Request) -> bool:
        return self.requests.get(request.request_id) is request

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.requests)

    def schedule(self) -> PrefillOnlySchedulerOutput:
        output = PrefillOnlySchedulerOutput()
        budget = self.max_num_batched_tokens
        while self.waiting and len(output.scheduled) < self.max_num_seqs:
            seq = self._tokenized_head()
            if seq is None:
                continue
            cached = seq.num_computed_tokens = (self.kv_cache_manager.allocate_cached_prefix(seq, budget)
                                                if self.uses_kv_cache else 0)
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
        output.block_copies = self.kv_cache_manager.take_copies()
        return output

    def _tokenized_head(self) -> PrefillOnlySequence | None:
        head = self.waiting[0]
        request = head.request if isinstance(head, PrefillOnlySequence) else head
        if not self._holds(request):  # aborted while it waited (its id may be taken again since)
            self.waiting.popleft()
            return None
        if isinstance(head, PrefillOnlySequence):
            return head
        seq = self.process_request(head)
        if seq is None:
            self.waiting.popleft()
            del self.requests[head.request_id]
            return None
        self.waiting[0] = seq
        return seq

    def free_finished(self, output: PrefillOnlySchedulerOutput) -> None:
        for item in output.scheduled:  # every input finishes in its step
            if item.seq.aborted:  # freed by abort_request already, and its id may be taken again since
                continue
            if self.in_step.pop(item.seq.request_id, None) is not None and self.uses_kv_cache:
                self.kv_cache_manager.free(item.seq)  # full blocks stay findable in the prefix cache
            del self.requests[item.seq.request_id]

    def get_stats(self) -> SchedulerStats:
        return self.stats(num_waiting=self.num_waiting, num_prompt_tokens=self.num_prompt_tokens)
