"""Where start-up goes (issue target: Qwen3-0.6B to its first token in <= 5 s): the W5 engine (random weights)
built and run to one token under cProfile; prints the calls that took longest, by cumulative and by own time.

    python -m benchmarks.startup
    python -m benchmarks.startup --shape llama-3.1-8b --rows 40
"""
import argparse
import cProfile
import io
import logging
import pstats
import time

from benchmarks.latency import stream_one
from benchmarks.model_folder import model_folder
from benchmarks.workloads import W5_SHAPE, w5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default=W5_SHAPE, help="a model shape in benchmarks/model_shapes")
    parser.add_argument("--rows", type=int, default=30, help="calls listed in each table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder, prompt = model_folder(args.shape), w5()
    from wde import LLMEngine
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    engine = LLMEngine.from_engine_args(model=folder, load_format="dummy", dtype="bfloat16", disable_log_stats=True)
    first_token_s = stream_one(engine, "startup", prompt, 1)[0]
    profiler.disable()
    total = time.perf_counter() - start
    for order in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(args.rows)
        logging.getLogger("benchmarks").info("calls by %s time:\n%s", order, text.getvalue())
    logging.getLogger("benchmarks").info("start-up to the first token %.2f s (the request itself %.3f s)", total,
                                         first_token_s)


if __name__ == "__main__":
    main()
