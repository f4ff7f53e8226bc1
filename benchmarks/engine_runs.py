"""Timing wde itself: repeated runs of LLM.generate, the engine's own step timings, and a profile of steps; and
the peer's turn after wde's."""
import argparse
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from wde import LLM, SamplingParams


@dataclass
class Run:
    seconds: float
    out_tokens: int
    in_tokens: int
    steps: int
    host_ms_per_step: float  # scheduling, input building and output processing, per step


def timed_generate(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> Run:
    before = llm.engine.get_stats().step_times
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = llm.engine.get_stats().step_times
    steps = after.num_steps - before.num_steps
    host_s = (after.schedule_s + after.output_s) - (before.schedule_s + before.output_s)
    return Run(seconds, sum(len(c.token_ids) for o in outputs for c in o.outputs),
               sum(len(o.prompt_token_ids) for o in outputs), steps, 1000 * host_s / max(steps, 1))


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]


def warm_up(llm: LLM, prompts: list[list[int]]) -> None:
    """Compile the kernels for prefill and decode shapes before anything is timed."""
    llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)


def profile_decode_steps(engine, prompts: list[list[int]], num_steps: int = 5, rows: int = 18) -> dict:
    """A torch profile of `num_steps` engine steps with all `prompts` decoding (after their prefill): the
    kernel table, and the GPU's busy time per step against the step's wall time (more wall than GPU time is
    the host, or gaps between kernels)."""
    from torch.profiler import ProfilerActivity, profile
    for i, prompt in enumerate(prompts):
        engine.add_request(f"profile-{i}", prompt, SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True))
    while engine.scheduler.waiting or engine.scheduler.new_requests or any(
            seq.num_computed_tokens < seq.num_prompt_tokens for seq in engine.scheduler.running):
        engine.step()
    for _ in range(3):  # steps in flight settle into the decode-only pattern
        engine.step()
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(num_steps):
            engine.step()
        synchronize()
        wall_s = time.perf_counter() - start
    for i in range(len(prompts)):
        engine.abort_request(f"profile-{i}")
    kernels = [event for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(event.device_time for event in kernels)
    return {"table": prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows),
            "kernels_per_step": round(len(kernels) / num_steps, 1),
            "gpu_busy_ms_per_step": round(gpu_us / 1000 / num_steps, 3),
            "wall_ms_per_step_profiled": round(1000 * wall_s / num_steps, 3)}


def traced_generate(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    """One run of LLM.generate with each engine step timed: wall time by the number of sequences running, so the
    ragged tail (few long sequences left) and the steps that still admit prompts show apart."""
    engine, real_step = llm.engine, llm.engine.step
    buckets: dict[str, list[float]] = {}

    def step():
        running, admitting = len(engine.scheduler.running), bool(engine.scheduler.waiting
                                                                 or engine.scheduler.new_requests)
        start = time.perf_counter()
        outputs = real_step()
        key = "admitting prompts" if admitting else f"decode <= {next(b for b in (8, 32, 128, 10**9) if running <= b)}"
        buckets.setdefault(key, []).append(time.perf_counter() - start)
        return outputs
    engine.step = step
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        del engine.step
    return {key: {"steps": len(times), "seconds": round(sum(times), 3), "ms_per_step": round(1000 * sum(times) /
                                                                                            len(times), 2)}
            for key, times in sorted(buckets.items())}


def spread(runs: list[Run], metric) -> list[float]:
    return [round(metric(r), 2) for r in runs]


def median(values: list[float]) -> float:
    return statistics.median(values)


def add_async_scheduling_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="launch each step before the last one's tokens reach the host (the engine's default: "
                             "on); --no-async-scheduling: synchronous steps")


def add_fp8_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantization", choices=["fp8"], help="FP8 weights (issue 18): compare with a run without")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="fp8: a float8 KV cache")


def fp8_settings(args) -> tuple[dict, str, dict]:
    """(engine arguments, workload-name suffix, value bytes for the roofline) of --quantization/--kv-cache-dtype."""
    engine = {"quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype}
    suffix = ("-fp8-weights" if args.quantization else "") + ("-fp8-kv" if args.kv_cache_dtype == "fp8" else "")
    value_bytes = {"weight_value_bytes": 1 if args.quantization else 2,
                   "kv_value_bytes": 1 if args.kv_cache_dtype == "fp8" else 2}
    return engine, suffix, value_bytes


def peer_figures(no_peer: bool, measure: Callable[[], dict]) -> tuple[dict | None, str | None]:
    """(the peer's figures, None), or (None, why not) with --no-peer. Call it after dropping the LLM: the memory
    wde held goes back to the GPU first."""
    if no_peer:
        return None, "skipped (--no-peer)"
    gc.collect()
    torch.cuda.empty_cache()
    return measure(), None
