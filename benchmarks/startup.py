"""Start-up to the first token (issue 15's target: Qwen3-0.6B in <= 5 s on an H200): the W5 engine (random
weights) built in a fresh Python process and run to one token, timed from the moment the process is started.

The first run gets an empty Triton cache (every kernel compiled: a machine's first start), the others share it
(what a user sees from the second start on); each run reports its phases (imports, the engine built, the first
token). The peer, transformers, builds the same shape with random weights on the GPU and generates one token, in
fresh processes too.

    python -m benchmarks.startup                 # cold + 3 warm runs, the peer, a result JSON
    python -m benchmarks.startup --profile       # one in-process start under cProfile, the slowest calls listed
    python -m benchmarks.startup --shape llama-3.1-8b --runs 5
"""
import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.workloads import W5_SHAPE

TARGET_S = 5.0
logger = logging.getLogger("benchmarks")


def build_and_first_token(shape: str) -> dict:
    """In this process: import wde, build the engine, stream one token; each phase's seconds."""
    start = time.perf_counter()
    from benchmarks.latency import stream_one
    from benchmarks.model_folder import model_folder
    from benchmarks.workloads import w5
    from wde import LLMEngine
    imported = time.perf_counter()
    engine = LLMEngine.from_engine_args(model=model_folder(shape), load_format="dummy", dtype="bfloat16",
                                        disable_log_stats=True)
    built = time.perf_counter()
    stream_one(engine, "startup", w5(), 1)
    return {"import_s": imported - start, "engine_s": built - imported, "first_token_s": time.perf_counter() - built}


def peer_first_token(shape: str) -> dict:
    """In this process: transformers builds the shape (random bf16 weights on the GPU) and generates one token."""
    start = time.perf_counter()
    import torch

    from benchmarks.peer import causal_lm, supports_sdpa
    from benchmarks.workloads import w5
    imported = time.perf_counter()
    model = causal_lm(shape, "sdpa" if supports_sdpa(shape) else "eager")
    built = time.perf_counter()
    model.generate(torch.tensor([w5()], device="cuda"), max_new_tokens=1, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return {"import_s": imported - start, "engine_s": built - imported, "first_token_s": time.perf_counter() - built}


def timed_child(shape: str, peer: bool, triton_cache: str) -> dict:
    """One start in a fresh process: its phases and the wall time from the process's launch to its first token
    (the child's exit, CUDA's teardown, is not counted)."""
    command = [sys.executable, "-m", "benchmarks.startup", "--child", "--shape", shape] + (["--peer"] if peer else [])
    env = {**os.environ, "TRITON_CACHE_DIR": triton_cache}
    start = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as child:
        for line in child.stdout:
            if line.startswith("{"):
                wall = time.perf_counter() - start
                phases = json.loads(line)
                break
        else:
            raise RuntimeError(f"the start-up child exited with {child.wait()} before its first token")
        child.wait()
    return {"wall_s": round(wall, 2), **{name: round(seconds, 2) for name, seconds in phases.items()}}


def starts(shape: str, runs: int, peer: bool) -> dict:
    with tempfile.TemporaryDirectory() as triton_cache:
        cold = timed_child(shape, peer, triton_cache)
        warm = [timed_child(shape, peer, triton_cache) for _ in range(runs)]
    median_warm = statistics.median(run["wall_s"] for run in warm)
    return {"cold_s": cold["wall_s"], "warm_s": median_warm, "cold": cold, "warm_runs": warm}


def profiled_start(shape: str, rows: int) -> None:
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    phases = build_and_first_token(shape)
    profiler.disable()
    for order in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(rows)
        logger.info("calls by %s time:\n%s", order, text.getvalue())
    logger.info("start-up to the first token %.2f s under the profiler (%s)", time.perf_counter() - start, phases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default=W5_SHAPE, help="a model shape in benchmarks/model_shapes")
    parser.add_argument("--runs", type=int, default=3, help="warm starts after the cold one")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--profile", action="store_true", help="one start under cProfile instead")
    parser.add_argument("--rows", type=int, default=30, help="calls listed in each --profile table")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one timed start (internal)
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)  # the child runs transformers
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.child:
        phases = peer_first_token(args.shape) if args.peer else build_and_first_token(args.shape)
        sys.stdout.write(json.dumps(phases) + "\n")
        sys.stdout.flush()
        return
    if args.profile:
        profiled_start(args.shape, args.rows)
        return
    from benchmarks.engine_runs import peer_figures
    from benchmarks.model_folder import model_folder
    from benchmarks.results_io import print_table, write_result
    model_folder(args.shape)  # written once, outside the timed starts
    wde = starts(args.shape, args.runs, peer=False)
    peer, peer_error = peer_figures(args.no_peer, lambda: starts(args.shape, args.runs, peer=True))
    import torch
    import transformers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = write_result("startup" if args.shape == W5_SHAPE else f"startup-{args.shape}", device, wde, peer,
                        peer_error, target_s=TARGET_S, workload_detail={
                            "shape": args.shape, "weights": "random bf16", "warm_runs": args.runs,
                            "statistic": "median of the warm runs", "transformers": transformers.__version__})
    print_table(f"start-up to the first token, {args.shape} (warm; cold {wde['cold_s']:.2f} s)", "seconds",
                wde["warm_s"], peer["warm_s"] if peer else None)
    logger.info("results written to %s", path)


if __name__ == "__main__":
    main()
