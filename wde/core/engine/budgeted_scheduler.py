"""What every Scheduler of a paged KV cache shares: its budgets, the lazy request processing it is given, one
live id per request, and the KV-cache part of its stats."""
from typing import Any, Callable

from wde.core import interfaces
from wde.core.engine.stats import SchedulerStats
from wde.core.request import Request


class BudgetedScheduler(interfaces.Scheduler[interfaces.SchedulerOutputT]):
    @classmethod
    def from_engine(cls, engine) -> "BudgetedScheduler":
        return cls(engine.config, engine.kv_cache_manager, engine.process_request)

    def __init__(self, config, kv_cache_manager: interfaces.KVCacheManager,
                 process_request: Callable[[Request], Any | None]):
        super().__init__(config)
        self.kv_cache_manager = kv_cache_manager
        self.process_request = process_request  # tokenizes; None when the request failed (the engine reports it)
        self.max_num_seqs = config.args.max_num_seqs
        self.max_num_batched_tokens = config.args.max_num_batched_tokens

    @staticmethod
    def check_new_id(request: Request, live: Any) -> None:
        """Refuse a request whose id an unfinished request holds (`live`: the ids, or a mapping by id)."""
        if request.request_id in live:
            raise ValueError(f"request id {request.request_id!r} is already in use")

    def stats(self, **scheduler_counts: Any) -> SchedulerStats:
        """SchedulerStats of the scheduler's own counts, with the KV cache's use and prefix hit rate."""
        kv = self.kv_cache_manager
        host = {}
        if kv.host_tier is not None:
            tier = kv.host_tier
            host = dict(host_kv_blocks_used=tier.num_held, host_kv_blocks_total=tier.num_blocks,
                        num_host_hit_blocks=tier.num_hit_blocks, num_host_spilled_blocks=tier.num_spilled_blocks,
                        host_kv_bytes_loaded=tier.num_hit_blocks * tier.block_bytes,
                        host_kv_bytes_spilled=tier.num_spilled_blocks * tier.block_bytes)
        return SchedulerStats(kv_blocks_used=kv.num_blocks - kv.num_free_blocks, kv_blocks_total=kv.num_blocks,
                              prefix_cache_hit_rate=kv.prefix_cache_hit_rate, **host, **scheduler_counts)
