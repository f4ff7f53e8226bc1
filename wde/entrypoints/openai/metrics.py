"""GET /metrics: the engines' state in Prometheus' text format."""
import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wde.core.engine.stats import EngineStats
    from wde.entrypoints.openai.served_engine import ServedEngine

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class LatencyHistogram:
    """Request latencies as Prometheus keeps them: a count per bucket, their sum and number (a server that
    runs for weeks must not keep one float per request)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))  # the last: above all
    total_s: float = 0.0
    count: int = 0

    @classmethod
    def merged(cls, histograms: list["LatencyHistogram"]) -> "LatencyHistogram":
        return cls([sum(counts) for counts in zip(*(h.counts for h in histograms))],
                   sum(h.total_s for h in histograms), sum(h.count for h in histograms))

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total_s += seconds
        self.count += 1


def render(engines: dict[str, "ServedEngine"], stats: dict[str, "EngineStats"]) -> str:
    """The engines' metrics; `stats` holds those of the engines still running (a stopped one has only its
    latency histogram)."""
    lines = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    running = [(f'{{model="{name}"}}', engine_stats) for name, engine_stats in stats.items()]
    metric("wde_requests_running", "gauge", "Requests running in the engine.",
           [(labels, s.num_running) for labels, s in running])
    metric("wde_requests_waiting", "gauge", "Requests waiting to run.",
           [(labels, s.num_waiting) for labels, s in running])
    metric("wde_kv_cache_usage_ratio", "gauge", "Share of KV-cache blocks in use.",
           [(labels, s.kv_blocks_used / max(s.kv_blocks_total, 1)) for labels, s in running])
    metric("wde_host_kv_cache_usage_ratio", "gauge", "Share of the KV cache's host-tier blocks holding a prefix.",
           [(labels, s.host_kv_blocks_used / s.host_kv_blocks_total) for labels, s in running
            if s.host_kv_blocks_total])
    host_tiers = [(labels, s) for labels, s in running if s.host_kv_blocks_total]
    for name, field, help_text in (
            ("blocks_hit", "num_host_hit_blocks", "KV blocks found in the host tier, so copied back to the device"),
            ("blocks_spilled", "num_host_spilled_blocks", "KV blocks copied from the device to the host tier"),
            ("blocks_swapped", "num_swapped_blocks", "KV blocks of preempted sequences copied to the host tier (of "
                                                     "those spilled)"),
            ("bytes_loaded", "host_kv_bytes_loaded", "Bytes of KV blocks copied from the host tier to the device"),
            ("bytes_spilled", "host_kv_bytes_spilled", "Bytes of KV blocks copied from the device to the host tier")):
        metric(f"wde_host_kv_{name}_total", "counter", f"{help_text}.",
               [(labels, getattr(s, field)) for labels, s in host_tiers])
    metric("wde_host_kv_copy_wait_seconds_total", "counter", "Time the device waited on KV copies from the host "
           "tier.", [(labels, round(s.step_times.host_copy_wait_s, 6)) for labels, s in host_tiers if s.step_times])
    metric("wde_prompt_tokens_per_second", "gauge", "Prompt tokens computed per second, last interval.",
           [(labels, round(s.prompt_tokens_per_s, 3)) for labels, s in running])
    metric("wde_generation_tokens_per_second", "gauge", "Tokens generated per second, last interval.",
           [(labels, round(s.generation_tokens_per_s, 3)) for labels, s in running])
    metric("wde_prompt_tokens_total", "counter", "Prompt tokens computed.",
           [(labels, s.num_prompt_tokens) for labels, s in running])
    metric("wde_generation_tokens_total", "counter", "Tokens generated.",
           [(labels, s.num_generation_tokens) for labels, s in running])
    metric("wde_steps_total", "counter", "Engine steps run.",
           [(labels, s.step_times.num_steps) for labels, s in running if s.step_times])
    for phase, help_text in (("schedule", "scheduling and building the model input (host)"),
                             ("execute", "the model step until its tokens are on the host"),
                             ("output", "tokens, stop checks, text and outputs (host)")):
        metric(f"wde_step_{phase}_seconds_total", "counter", f"Time in steps spent on {help_text}.",
               [(labels, round(getattr(s.step_times, f"{phase}_s"), 6)) for labels, s in running if s.step_times])
    lines += ["# HELP wde_request_latency_seconds Time from a request's arrival to its last output.",
              "# TYPE wde_request_latency_seconds histogram"]
    for name, engine in engines.items():
        histogram, labels, below = engine.latency, f'{{model="{name}"}}', 0
        model = labels[1:-1]
        for bound, count in zip(LATENCY_BUCKETS, histogram.counts):
            below += count
            lines.append(f'wde_request_latency_seconds_bucket{{{model},le="{bound}"}} {below}')
        lines.append(f'wde_request_latency_seconds_bucket{{{model},le="+Inf"}} {histogram.count}')
        lines.append(f"wde_request_latency_seconds_sum{labels} {round(histogram.total_s, 6)}")
        lines.append(f"wde_request_latency_seconds_count{labels} {histogram.count}")
    return "\n".join(lines) + "\n"
