"""Engine statistics: what is queued and running, KV-cache use, prefix hits, and token rates."""
import logging
import time
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 5.0


@dataclass
class SchedulerStats:
    """What a scheduler reports; counters are totals since the engine started."""

    num_running: int = 0
    num_waiting: int = 0
    num_preempted: int = 0  # sequences waiting to be recomputed after a preemption
    num_preemptions: int = 0
    num_swapped_blocks: int = 0  # of preempted sequences, copied to the host tier (preemption_mode="swap")
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_hit_rate: float = 0.0  # prompt tokens found in the prefix cache / tokens looked up
    # the KV cache's host tier (kv_offload_gib): its blocks, those found there (so copied back to the device),
    # and those copied there from the device (evicted from its cache, or swapped out); the bytes they moved
    host_kv_blocks_used: int = 0
    host_kv_blocks_total: int = 0
    num_host_hit_blocks: int = 0
    num_host_spilled_blocks: int = 0
    host_kv_bytes_loaded: int = 0
    host_kv_bytes_spilled: int = 0
    num_prompt_tokens: int = 0  # tokens prefilled (prompts, and sequences recomputed after preemption)
    num_generation_tokens: int = 0


@dataclass
class StepTimes:
    """Where the engine's steps spent their time, in seconds since start."""

    num_steps: int = 0
    schedule_s: float = 0.0  # scheduling and building the model input (host)
    execute_s: float = 0.0  # the model step until its sampled tokens are on the host (device, and launches)
    output_s: float = 0.0  # appending tokens, stop checks, text, outputs, freeing (host)
    host_copy_wait_s: float = 0.0  # the device waiting on KV copies from the host tier (the executor's count)

    @property
    def host_ms_per_step(self) -> float:
        return 1000 * (self.schedule_s + self.output_s) / max(self.num_steps, 1)


@dataclass
class EngineStats(SchedulerStats):
    prompt_tokens_per_s: float = 0.0  # over the last completed interval (or since start, before the first)
    generation_tokens_per_s: float = 0.0
    step_times: StepTimes | None = None


# the fields that only grow (totals since start); the others say how things stand now
COUNTERS = ("num_preemptions", "num_swapped_blocks", "num_host_hit_blocks", "num_host_spilled_blocks",
            "host_kv_bytes_loaded", "host_kv_bytes_spilled", "num_prompt_tokens", "num_generation_tokens")


def merged_stats(live: list[EngineStats], stopped: list[EngineStats] = ()) -> EngineStats:
    """The stats of several engines (the replicas of a data-parallel model) as one: the running ones' counts,
    rates and times added, the prefix cache's hit rate their mean; the last stats of stopped ones add only
    their counters and step times (a total that went down would read as a restart)."""
    fields = {name: sum(getattr(s, name) for s in [*live, *(stopped if name in COUNTERS else ())])
              for name in EngineStats.__dataclass_fields__ if name not in ("prefix_cache_hit_rate", "step_times")}
    times = [s.step_times for s in [*live, *stopped] if s.step_times is not None]
    step_times = StepTimes(**{name: sum(getattr(t, name) for t in times) for name in StepTimes.__dataclass_fields__})
    return EngineStats(**fields, prefix_cache_hit_rate=sum(s.prefix_cache_hit_rate for s in live) / max(len(live), 1),
                       step_times=step_times if times else None)


class StatsTracker:
    """Turns scheduler counters into rates per interval, and logs a line every interval when enabled."""

    def __init__(self, log: bool, interval_s: float = LOG_INTERVAL_S):
        self.log, self.interval_s = log, interval_s
        self._mark_time, self._mark_prompt, self._mark_generation = time.monotonic(), 0, 0
        self._rates = (0.0, 0.0)
        self._first_interval = True

    def stats(self, scheduler_stats: SchedulerStats, step_times: StepTimes | None = None) -> EngineStats:
        return EngineStats(**asdict(scheduler_stats), prompt_tokens_per_s=self._rates[0],
                           generation_tokens_per_s=self._rates[1], step_times=step_times)

    def on_step(self, scheduler_stats: SchedulerStats) -> None:
        now = time.monotonic()
        elapsed = now - self._mark_time
        if elapsed < self.interval_s:
            if self._first_interval and elapsed > 0:  # until one interval is complete: rates since start
                self._rates = self._rates_since_mark(scheduler_stats, elapsed)
            return
        self._rates = self._rates_since_mark(scheduler_stats, elapsed)
        self._first_interval = False
        self._mark_time = now
        self._mark_prompt, self._mark_generation = (scheduler_stats.num_prompt_tokens,
                                                    scheduler_stats.num_generation_tokens)
        if self.log:
            s = self.stats(scheduler_stats)
            logger.info("prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d (%d preempted), "
                        "KV cache %.1f%% used, prefix cache hit rate %.1f%%%s", s.prompt_tokens_per_s,
                        s.generation_tokens_per_s, s.num_running, s.num_waiting, s.num_preempted,
                        100 * s.kv_blocks_used / max(s.kv_blocks_total, 1), 100 * s.prefix_cache_hit_rate,
                        f", host tier {s.host_kv_blocks_used}/{s.host_kv_blocks_total} blocks ("
                        f"{s.num_host_hit_blocks} hit, {s.num_host_spilled_blocks} spilled, "
                        f"{s.num_swapped_blocks} of them swapped out)"
                        if s.host_kv_blocks_total else "")

    def _rates_since_mark(self, stats: SchedulerStats, elapsed: float) -> tuple[float, float]:
        return ((stats.num_prompt_tokens - self._mark_prompt) / elapsed,
                (stats.num_generation_tokens - self._mark_generation) / elapsed)
