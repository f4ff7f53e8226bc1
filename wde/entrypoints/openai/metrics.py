"""GET /metrics: the engines' state in Prometheus' text format."""
from wde.entrypoints.openai.async_engine import AsyncEngine

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def render(engines: list[AsyncEngine]) -> str:
    lines = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    stats = [(f'{{model="{e.name}"}}', e, e.engine.get_stats()) for e in engines]
    metric("wde_requests_running", "gauge", "Requests running in the engine.",
           [(labels, s.num_running) for labels, _, s in stats])
    metric("wde_requests_waiting", "gauge", "Requests waiting to run.",
           [(labels, s.num_waiting) for labels, _, s in stats])
    metric("wde_kv_cache_usage_ratio", "gauge", "Share of KV-cache blocks in use.",
           [(labels, s.kv_blocks_used / max(s.kv_blocks_total, 1)) for labels, _, s in stats])
    metric("wde_prompt_tokens_per_second", "gauge", "Prompt tokens computed per second, last interval.",
           [(labels, round(s.prompt_tokens_per_s, 3)) for labels, _, s in stats])
    metric("wde_generation_tokens_per_second", "gauge", "Tokens generated per second, last interval.",
           [(labels, round(s.generation_tokens_per_s, 3)) for labels, _, s in stats])
    metric("wde_prompt_tokens_total", "counter", "Prompt tokens computed.",
           [(labels, s.num_prompt_tokens) for labels, _, s in stats])
    metric("wde_generation_tokens_total", "counter", "Tokens generated.",
           [(labels, s.num_generation_tokens) for labels, _, s in stats])
    lines += ["# HELP wde_request_latency_seconds Time from a request's arrival to its last output.",
              "# TYPE wde_request_latency_seconds histogram"]
    for labels, engine, _ in stats:
        latencies = list(engine.latencies)
        model = labels[1:-1]
        for bound in LATENCY_BUCKETS:
            lines.append(f'wde_request_latency_seconds_bucket{{{model},le="{bound}"}} '
                         f'{sum(1 for x in latencies if x <= bound)}')
        lines.append(f'wde_request_latency_seconds_bucket{{{model},le="+Inf"}} {len(latencies)}')
        lines.append(f"wde_request_latency_seconds_sum{labels} {round(sum(latencies), 6)}")
        lines.append(f"wde_request_latency_seconds_count{labels} {len(latencies)}")
    return "\n".join(lines) + "\n"
