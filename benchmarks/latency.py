"""Workload W5 of GUIDE.md: one stream. Qwen3-0.6B shape (random bf16 weights), a 128-token prompt, 256 new
tokens (EOS ignored, greedy), batch 1.

    python -m benchmarks.latency
    python -m benchmarks.latency --shape llama-3.1-8b      # W5-8B: the same stream on Llama-3.1-8B's shape

Reports output tokens/s over the whole request, the time to the first token, and the start-up time (building
the engine, CUDA graphs included, until a first request's first token), against transformers' `generate`.
"""
import argparse
import logging
import statistics
import time

import torch

from benchmarks.engine_runs import (add_async_scheduling_flag, add_fp8_flags, fp8_settings, peer_figures,
                                    profile_decode_steps)
from benchmarks.model_folder import model_folder
from benchmarks.results_io import print_table, write_result
from benchmarks.roofline import generation_cost, print_roofline, roofline
from benchmarks.workloads import W5_SHAPE, w5

logger = logging.getLogger("benchmarks")
NEW_TOKENS = 256


def stream_one(engine, request_id: str, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds to the last) for one request alone in the engine."""
    from wde import RequestOutputKind, SamplingParams
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    start = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    first = None
    while engine.has_unfinished_requests():
        if engine.step() and first is None:
            first = time.perf_counter() - start
    return first, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default=W5_SHAPE, help="a model shape in benchmarks/model_shapes")
    parser.add_argument("--runs", type=int, default=5)
    add_async_scheduling_flag(parser)
    add_fp8_flags(parser)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="also record a kernel profile of decode steps: the GPU's busy time against the wall's")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from wde import LLMEngine
    prompt = w5()
    fp8_engine, fp8_suffix, value_bytes = fp8_settings(args)
    start = time.perf_counter()
    engine = LLMEngine.from_engine_args(model=model_folder(args.shape), load_format="dummy", dtype="bfloat16",
                                        disable_log_stats=True, async_scheduling=args.async_scheduling, **fp8_engine)
    built = time.perf_counter() - start
    startup_first_token = stream_one(engine, "startup", prompt, 1)[0] + built
    stream_one(engine, "warm-up", prompt, 32)
    before = engine.get_stats().step_times
    runs = [stream_one(engine, f"run-{i}", prompt, NEW_TOKENS) for i in range(args.runs)]
    after = engine.get_stats().step_times
    host_s = (after.schedule_s + after.output_s) - (before.schedule_s + before.output_s)
    wde = {"tok_per_s": round(statistics.median(NEW_TOKENS / total for _, total in runs), 1),
           "ttft_ms": round(1000 * statistics.median(first for first, _ in runs), 2),
           "ms_per_output_token": round(1000 * statistics.median((total - first) / (NEW_TOKENS - 1)
                                                                 for first, total in runs), 3),
           "startup_to_first_token_s": round(startup_first_token, 1), "startup_engine_built_s": round(built, 1),
           "runs_tok_per_s": [round(NEW_TOKENS / total, 1) for _, total in runs],
           "host_ms_per_step": round(1000 * host_s / max(after.num_steps - before.num_steps, 1), 3)}
    if args.profile:
        profiled = profile_decode_steps(engine, [prompt], num_steps=20, rows=24)
        print(profiled.pop("table"))
        wde["decode_step_profile"] = profiled
        print("decode step profile:", profiled)
    async_scheduling = engine.config.args.async_scheduling
    del engine
    limit = roofline(generation_cost(args.shape, [len(prompt)], [NEW_TOKENS], 1, **value_bytes), NEW_TOKENS,
                     "out tok/s", wde["tok_per_s"])

    def measure_peer() -> dict:
        from benchmarks.peer import single_stream
        return single_stream(args.shape, prompt, NEW_TOKENS)
    peer, peer_error = peer_figures(args.no_peer, measure_peer)
    detail = {"shape": args.shape, "weights": "random bf16", "prompt_len": len(prompt), "new_tokens": NEW_TOKENS,
              "batch": 1, "async_scheduling": async_scheduling, "runs": args.runs, "statistic": "median",
              **fp8_engine}
    workload = ("W5" if args.shape == W5_SHAPE else f"W5-{args.shape}") + fp8_suffix
    path = write_result(workload, "cuda", wde, peer, peer_error, workload_detail=detail, roofline=limit)
    print_table(f"{workload} single stream ({torch.cuda.get_device_name(0)})", "output tok/s", wde["tok_per_s"],
                peer["tok_per_s"] if peer else None)
    print_roofline(limit)
    print(f"time to first token {wde['ttft_ms']} ms; start-up to first token {wde['startup_to_first_token_s']} s")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
