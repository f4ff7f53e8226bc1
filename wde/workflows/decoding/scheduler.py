"""Continuous batching: at every step, running sequences continue and waiting ones join, within budgets.

A step computes `num_tokens - num_computed_tokens` new tokens for each sequence it takes: one for a sequence
that is decoding, the rest of the prompt (or as much as the token budget leaves) for one that is prefilling.
So prefill and decode share a step, and a long prompt is prefilled in chunks across steps.
"""
import logging
from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass
from typing import Callable

import torch

from wde.core.engine.budgeted_scheduler import BudgetedScheduler
from wde.core.engine.scheduler_output import SchedulerOutput as BaseSchedulerOutput
from wde.core.engine.stats import SchedulerStats
from wde.core.request import Request
from wde.workflows.decoding.sequence import Sequence, SequenceGroup, SequenceStatus

logger = logging.getLogger(__name__)
GRAMMAR_WAIT_S = 0.05  # an idle step waits at most this for a compiling grammar


@dataclass
class ScheduledSequence:
    seq: Sequence
    start: int  # tokens already in the KV cache before this step
    num_tokens: int  # tokens computed in this step
    samples: bool  # the step reaches the end of the sequence, so it yields the next token
    # its input token was replaced after the step launched (async scheduling): what the step yields for it is
    # dropped, and the scheduler has the position computed again
    rewound: bool = False

    def written_blocks(self, block_size: int) -> list[int]:
        """The blocks this step writes, in every KV layer group."""
        first, last = self.start // block_size, (self.start + self.num_tokens - 1) // block_size + 1
        return [block for table in (self.seq.block_table, *self.seq.group_tables) for block in table[first:last]]


def scheduled(seq: Sequence, num_tokens: int) -> ScheduledSequence:
    start = seq.num_computed_tokens
    return ScheduledSequence(seq, start, num_tokens, start + num_tokens == seq.num_tokens)


@dataclass
class SchedulerOutput(BaseSchedulerOutput[ScheduledSequence]):
    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class DecodingScheduler(BudgetedScheduler[SchedulerOutput]):
    """The one writer of a sequence's scheduling state (`status`, `num_computed_tokens`, `num_preemptions`);
    its blocks are the KVCacheManager's to write."""

    def __init__(self, config, kv_cache_manager, process_request: Callable[[Request], SequenceGroup | None]):
        super().__init__(config, kv_cache_manager, process_request)
        self.new_requests: deque[Request] = deque()  # submitted, not yet tokenized
        self.waiting: deque[Sequence] = deque()  # tokenized (or preempted), waiting for KV blocks
        self.running: list[Sequence] = []  # in admission order
        self.requests: dict[str, Request | SequenceGroup] = {}  # every unfinished request
        self.num_preemptions = 0
        self.num_swapped_blocks = 0  # of preempted sequences, to the host tier
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    def add_request(self, request: Request) -> None:
        self.check_new_id(request, self.requests)
        self.requests[request.request_id] = request
        self.new_requests.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def abort_request(self, request_id: str) -> bool:
        entry = self.requests.pop(request_id, None)
        if entry is None:
            return False
        if isinstance(entry, Request):
            if entry in self.new_requests:  # (not when it failed while being tokenized)
                self.new_requests.remove(entry)
            # its grammar's compilation is left to run: the compiled grammars are shared by every request with
            # the same constraint, and cancelling it would fail the others
            return True
        for seq in entry.sequences:
            if seq.status is SequenceStatus.WAITING:
                self.waiting.remove(seq)
            elif seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
                self._release_blocks(seq)
            else:
                continue  # finished earlier
            self._drop_pending(seq)
            seq.finish("abort")
        return True

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.max_num_batched_tokens
        budget, preempted = self._schedule_running(output, budget)
        if not preempted:  # when blocks ran short, admitting more would only preempt again
            self._admit_waiting(output, budget)
        for item in output.scheduled:
            seq = item.seq
            decoding = item.num_tokens == 1 and item.start >= seq.num_prompt_tokens
            self.num_prompt_tokens += 0 if decoding else item.num_tokens
            self.num_generation_tokens += item.samples
            seq.num_computed_tokens += item.num_tokens
            seq.num_pending_tokens += item.samples  # until the OutputProcessor appends the token
        output.block_copies = self.kv_cache_manager.take_copies()
        return output

    def get_stats(self) -> SchedulerStats:
        return self.stats(num_running=len(self.running), num_waiting=len(self.waiting) + len(self.new_requests),
                          num_preempted=sum(seq.num_preemptions > 0 for seq in self.waiting),
                          num_preemptions=self.num_preemptions, num_swapped_blocks=self.num_swapped_blocks,
                          num_prompt_tokens=self.num_prompt_tokens,
                          num_generation_tokens=self.num_generation_tokens)

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> tuple[int, bool]:
        preempted, i = False, 0
        block_size = self.kv_cache_manager.block_size
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending_tokens and seq.num_output_tokens + seq.num_pending_tokens >= seq.max_output_tokens:
                i += 1  # its last token is in flight (async scheduling): it finishes when that arrives
                continue
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            # fast path of one token (a decode step, or a prompt's chunk cut to one by the budget): it fits in
            # the last block without filling it
            if num_tokens == 1 and (seq.num_computed_tokens + 1) % block_size and \
                    seq.num_computed_tokens < len(seq.block_table) * block_size:
                output.scheduled.append(ScheduledSequence(seq, seq.num_computed_tokens, 1,
                                                          seq.num_computed_tokens + 1 == seq.num_tokens))
                budget -= 1
                i += 1
                continue
            self.kv_cache_manager.free_outside_window(seq)  # a windowed model's old blocks make room first
            while not self.kv_cache_manager.allocate_slots(seq, num_tokens):
                preempted = True
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                if victim is seq:
                    return budget, preempted
            output.scheduled.append(scheduled(seq, num_tokens))
            budget -= num_tokens
            i += 1
        return budget, preempted

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks (swapped out to the host tier first, with preemption_mode="swap"); it
        waits at the front and, readmitted, computes again the tokens whose K/V no tier holds."""
        num_swapped = self.kv_cache_manager.swap_out(seq)
        self.num_swapped_blocks += num_swapped
        self._release_blocks(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.info("preempted request %s (sequence %d, %d tokens, %d blocks swapped out) to free KV blocks; %d "
                    "free now", seq.group.request_id, seq.index, seq.num_tokens, num_swapped,
                    self.kv_cache_manager.num_free_blocks)

    def _admit_waiting(self, output: SchedulerOutput, budget: int) -> None:
        while budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting(output)
            if seq is None:
                return
            cached = 0
            if seq.prompt_logprobs is None:  # prompt logprobs need every prompt position computed
                cached = seq.num_computed_tokens = self.kv_cache_manager.allocate_cached_prefix(seq, budget)
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            self.kv_cache_manager.free_outside_window(seq)  # of a cached prefix longer than the window
            if not self.kv_cache_manager.allocate_slots(seq, num_tokens):
                self._release_blocks(seq)  # give back the cached prefix too; it waits
                return
            if self.kv_cache_manager.enable_prefix_caching:
                self.kv_cache_manager.count_prefix_lookup(seq.num_tokens, cached)
            if seq.index == 0 and seq.num_preemptions == 0:
                seq.group.num_cached_tokens = cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            output.scheduled.append(scheduled(seq, num_tokens))
            budget -= num_tokens

    def _release_blocks(self, seq: Sequence) -> None:
        """Its blocks go back; nothing of it is in the cache any more, so all its tokens are to compute."""
        self.kv_cache_manager.free(seq)
        seq.num_computed_tokens = 0

    def _next_waiting(self, output: SchedulerOutput) -> Sequence | None:
        """The first waiting sequence, tokenizing new requests (lazily, only now) when none is waiting.

        The hook an admission order overrides (docs/plugins.md); `output` is the step scheduled so far."""
        while not self.waiting and (request := self._next_ready_request()) is not None:
            group = self.process_request(request)
            if group is None:
                del self.requests[request.request_id]
                continue
            self.requests[request.request_id] = group
            self.waiting.extend(group.sequences)
        return self.waiting[0] if self.waiting else None

    def _next_ready_request(self) -> Request | None:
        """The first new request that can be tokenized now, taken from new_requests: one whose structured
        output's grammar is still compiling waits, and the requests behind it go first. With nothing else to
        run, the step waits a little for a grammar rather than return empty at once, again and again."""
        for index, request in enumerate(self.new_requests):
            if request.grammar is None or request.grammar.done():
                del self.new_requests[index]
                return request
        if self.new_requests and not self.running:
            wait([r.grammar for r in self.new_requests], timeout=GRAMMAR_WAIT_S, return_when=FIRST_COMPLETED)
        return None

    def rewind(self, item: ScheduledSequence) -> None:
        """`item`, of the step in flight, computed its sequence's last position from a token the host replaced
        since: that position is computed again by the next step, and the token the step samples for it is
        dropped. (The block it wrote is not in the prefix cache: a block is hashed from known tokens only.) A
        seeded sequence goes on with a copy of its generator as it is now: the step's sampling, still to come,
        draws from the one it holds, and the sequence's tokens stay those of the synchronous engine."""
        seq = item.seq
        item.rewound = True
        seq.num_computed_tokens -= item.num_tokens
        seq.num_pending_tokens -= 1
        self.num_generation_tokens -= 1
        if seq.generator is not None:
            seq.generator = torch.Generator(seq.generator.device).set_state(seq.generator.get_state())

    def _drop_pending(self, seq) -> None:
        """A sequence that ends with tokens in flight (async scheduling: a step launched before it stopped)
        never gets them: they are not generated tokens."""
        self.num_generation_tokens -= seq.num_pending_tokens
        seq.num_pending_tokens = 0

    def free_finished(self, output: SchedulerOutput) -> None:
        """Release the blocks of sequences the OutputProcessor finished in this step."""
        finished = [s.seq for s in output.scheduled if s.seq.is_finished]
        if not finished:
            return
        for seq in finished:
            self._drop_pending(seq)
            self.kv_cache_manager.free(seq)
            # by identity: an id may be in use again by a newer request (async scheduling finishes a step
            # launched for sequences that had stopped, after their request ended and its id came back)
            if seq.group.is_finished and self.requests.get(seq.group.request_id) is seq.group:
                del self.requests[seq.group.request_id]
        self.running = [seq for seq in self.running if not seq.is_finished]
        # preempted (so back to 0 computed tokens, and waiting) while its last token was in flight
        if any(seq.num_computed_tokens == 0 for seq in finished):
            self.waiting = deque(seq for seq in self.waiting if not seq.is_finished)
