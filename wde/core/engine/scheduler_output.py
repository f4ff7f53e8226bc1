"""What a Scheduler hands on for one step: the work it scheduled, one entry per sequence, each knowing its
Request. The engine reads only this much of it (to fail a step's requests, or to build a step without some of
them); the workflow's ModelPreProcessor and OutputProcessor read the rest."""
import copy
from dataclasses import dataclass, field, replace
from typing import Generic, Protocol, TypeVar

from wde.core.kv_cache.host_tier import BlockCopies
from wde.core.request import Request


class HasRequest(Protocol):
    @property
    def request(self) -> Request: ...


class HasBlocks(HasRequest, Protocol):
    block_table: list[int]
    group_tables: list[list[int]]  # of the KV layer groups after the first

    @property
    def is_finished(self) -> bool:
        """Ended (stopped, or aborted) while a step that holds it ran."""


class Scheduled(Protocol):
    """One scheduled entry: `seq` is the workflow's sequence state."""

    seq: HasBlocks

    def written_blocks(self, block_size: int) -> list[int]:
        """The KV-cache blocks this step writes for this entry."""


Item = TypeVar("Item", bound=Scheduled)


@dataclass
class SchedulerOutput(Generic[Item]):
    scheduled: list[Item] = field(default_factory=list)
    # copies between the KV cache's tiers the step runs before its forward pass (whichever of its requests run)
    block_copies: BlockCopies = field(default_factory=BlockCopies)

    def requests(self) -> list[Request]:
        """The requests of the scheduled entries, each once, in order."""
        return list({id(item.seq.request): item.seq.request for item in self.scheduled}.values())

    def unfinished_requests(self) -> list[Request]:
        """The requests that still wait for this step: with async scheduling a step may hold sequences that
        stopped, or were aborted (their ids perhaps taken again since), while it ran."""
        return list({id(item.seq.request): item.seq.request for item in self.scheduled
                     if not item.seq.is_finished}.values())

    def written_blocks(self, request_ids: set[str], block_size: int) -> set[int]:
        return {block for item in self.scheduled if item.seq.request.request_id in request_ids
                for block in item.written_blocks(block_size)}

    def requests_reading(self, blocks: set[int]) -> list[Request]:
        """The requests whose sequences hold one of `blocks` (so read them, as a cached prefix)."""
        return list({id(item.seq.request): item.seq.request for item in self.scheduled
                     if not blocks.isdisjoint(item.seq.block_table)
                     or any(not blocks.isdisjoint(table) for table in item.seq.group_tables)}.values())

    def only(self, request_ids: set[str]) -> "SchedulerOutput[Item]":
        return replace(self, scheduled=[s for s in self.scheduled if s.seq.request.request_id in request_ids])

    def detached(self) -> "SchedulerOutput[Item]":
        """A copy whose entries hold copies of their sequences: what building it writes to a sequence (its row
        among the step's samples) stays in the copy. The engine builds these to find which request breaks a
        step, without changing the step it then launches."""
        return replace(self, scheduled=[replace(item, seq=copy.copy(item.seq)) for item in self.scheduled])

    def without(self, request_ids: set[str]) -> "SchedulerOutput[Item]":
        return replace(self, scheduled=[s for s in self.scheduled if s.seq.request.request_id not in request_ids])
