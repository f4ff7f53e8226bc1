"""Online serving, workload W6: `wde serve` started as a user starts it, driven over HTTP by the official openai
async client (streamed completions, EOS ignored), against the offline LLM.generate figure of the same run.

    python -m benchmarks.serving                          # GPU: W1's model and prompts
    python -m benchmarks.serving --device cpu --num-prompts 16 --poisson-requests 32   # a CPU smoke run

Two phases: a burst (all of W1's 256 requests at once, no concurrency cap) and 1,000 requests of W1's shape
arriving at Poisson times at half the burst's request rate. Reported: output tokens per second, time to first
token and the gaps between streamed chunks (p50 / p99), and how many tokens a chunk held (more than one when the
server coalesced tokens a client had not read yet). The client runs in several processes, each with its own
event loop, so that reading 25,000 chunks a second does not make the load generator the bottleneck.

Targets (issue "Serving at load"): burst throughput >= 90% of offline W1; at the Poisson rate, TTFT p99 <= 150 ms
and inter-token p99 <= 2x the offline mean step time.
"""
import argparse
import asyncio
import gc
import logging
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import time

import torch

from benchmarks.engine_runs import timed_generate, warm_up
from benchmarks.model_folder import model_folder
from benchmarks.results_io import write_result
from benchmarks.workloads import W1_SHAPE, w1

logger = logging.getLogger("benchmarks")
SERVED_NAME = "w6"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_flags(args) -> list[str]:
    if args.device == "cpu":
        return ["--device", "cpu", "--max-num-seqs", str(args.max_num_seqs)]
    return ["--model", model_folder(W1_SHAPE), "--load-format", "dummy", "--dtype", "bfloat16",
            "--max-num-seqs", str(args.max_num_seqs)]


def offline(args, prompts, output_lens) -> dict:
    """W1 through LLM.generate in this process, once the server is gone: the figure the server is held to."""
    from wde import LLM, SamplingParams
    flags = engine_flags(args)
    options = {flags[i][2:].replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}
    options["max_num_seqs"] = int(options["max_num_seqs"])
    llm = LLM(**options)
    warm_up(llm, prompts)
    run = timed_generate(llm, prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                                        for n in output_lens])
    del llm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"out_tok_per_s": round(run.out_tokens / run.seconds, 1), "seconds": round(run.seconds, 2),
            "steps": run.steps, "ms_per_step": round(1000 * run.seconds / run.steps, 3),
            "host_ms_per_step": round(run.host_ms_per_step, 3)}


def start_server(args, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "wde.entrypoints.cli", "serve", "--port", str(port),
               "--served-model-name", SERVED_NAME, "--disable-log-stats", *engine_flags(args)]
    logger.info("starting %s", " ".join(command))
    server = subprocess.Popen(command)
    import httpx
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"wde serve exited with code {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise TimeoutError(f"wde serve was not up after {args.start_timeout} s")


async def one_request(client, prompt: list[int], max_tokens: int, send_at: float) -> dict:
    await asyncio.sleep(max(0.0, send_at - time.time()))
    sent = time.time()
    chunk_times, tokens = [], 0
    stream = await client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            chunk_times.append(time.time())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"sent": sent, "chunks": chunk_times, "tokens": tokens}


def client_process(url: str, requests: list[tuple[list[int], int, float]]) -> list[dict]:
    """One load-generating process: its share of the requests, each sent at its time (seconds since the epoch)."""
    import openai

    async def run() -> list[dict]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
        return await asyncio.gather(*(one_request(client, *request) for request in requests))
    return asyncio.run(run())


def load_client(barrier) -> str:
    """A load-generating process's start: the client library loaded before any clock starts."""
    import openai
    gc.collect()  # the load generator's own full collections would read as the server's inter-token stalls
    gc.freeze()
    barrier.wait()
    return openai.__version__


def drive(pool, num_clients: int, url: str, prompts, output_lens, offsets: list[float]) -> dict:
    """Send request i at offsets[i] seconds after a common start, from the pool's num_clients processes."""
    start = time.time() + 0.5
    shares = [[] for _ in range(num_clients)]
    for i, (prompt, n, offset) in enumerate(zip(prompts, output_lens, offsets)):
        shares[i % len(shares)].append((prompt, n, start + offset))
    records = [r for share in pool.starmap(client_process, [(url, share) for share in shares], chunksize=1)
               for r in share]
    return summarize(records)


def engine_counters(url: str) -> dict[str, float]:
    """The engine's step counters from /metrics: steps, and seconds scheduling, executing, making outputs."""
    import httpx
    counters = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0]
        if name in ("wde_steps_total", "wde_step_schedule_seconds_total", "wde_step_execute_seconds_total",
                    "wde_step_output_seconds_total"):
            counters[name] = float(line.rsplit(" ", 1)[1])
    return counters


def steps_between(before: dict[str, float], after: dict[str, float]) -> dict:
    steps = after["wde_steps_total"] - before["wde_steps_total"]
    spent = {name: after[name] - before[name] for name in after}
    return {"steps": int(steps),
            "host_ms_per_step": round(1000 * (spent["wde_step_schedule_seconds_total"] +
                                              spent["wde_step_output_seconds_total"]) / max(steps, 1), 3),
            "execute_ms_per_step": round(1000 * spent["wde_step_execute_seconds_total"] / max(steps, 1), 3)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarize(records: list[dict]) -> dict:
    """Throughput over the time from the first request sent to the last token received."""
    start, end = min(r["sent"] for r in records), max(r["chunks"][-1] for r in records if r["chunks"])
    tokens = sum(r["tokens"] for r in records)
    ttft = [1000 * (r["chunks"][0] - r["sent"]) for r in records if r["chunks"]]
    gaps = [1000 * (b - a) for r in records for a, b in zip(r["chunks"], r["chunks"][1:])]
    chunks = sum(len(r["chunks"]) for r in records)
    return {"requests": len(records), "out_tokens": tokens, "seconds": round(end - start, 2),
            "out_tok_per_s": round(tokens / (end - start), 1), "req_per_s": round(len(records) / (end - start), 2),
            "ttft_ms_p50": round(percentile(ttft, 0.5), 1), "ttft_ms_p99": round(percentile(ttft, 0.99), 1),
            "chunk_gap_ms_p50": round(percentile(gaps, 0.5), 2), "chunk_gap_ms_p99": round(percentile(gaps, 0.99), 2),
            "tokens_per_chunk": round(tokens / max(chunks, 1), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-prompts", type=int, default=256, help="the burst's requests (W1: 256)")
    parser.add_argument("--poisson-requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, help="Poisson arrivals per second (default: half the burst's)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--clients", type=int, default=min(8, os.cpu_count() or 1), help="load-generator processes")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--output-scale", type=float, default=1.0, help="CPU smoke runs: shorten W1's outputs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prompts, output_lens = w1(args.num_prompts)
    output_lens = [max(1, int(n * args.output_scale)) for n in output_lens]
    port = free_port()
    server = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(args.clients + 1)
    try:
        with context.Pool(args.clients, initializer=load_client, initargs=(barrier,)) as pool:
            barrier.wait(timeout=300)  # every client process loaded: none is still starting when requests are due
            drive(pool, args.clients, url, prompts[:8], [16] * 8, [0.0] * 8)  # warm-up: the first shapes
            before = engine_counters(url)
            burst = drive(pool, args.clients, url, prompts, output_lens, [0.0] * len(prompts))
            burst["engine"] = steps_between(before, engine_counters(url))
            logger.info("burst: %s", burst)
            rate = args.rate or burst["req_per_s"] / 2
            arrivals, rng, offset = [], random.Random(0), 0.0
            for _ in range(args.poisson_requests):
                offset += rng.expovariate(rate)
                arrivals.append(offset)
            poisson_prompts, poisson_lens = w1(args.poisson_requests, seed=1)
            poisson_lens = [max(1, int(n * args.output_scale)) for n in poisson_lens]
            poisson = {"rate_req_per_s": round(rate, 2),
                       **drive(pool, args.clients, url, poisson_prompts, poisson_lens, arrivals)}
            logger.info("poisson: %s", poisson)
    finally:
        server.terminate()
        server.wait(timeout=60)
    reference = offline(args, prompts, output_lens)  # after the server: its process gave the GPU's memory back
    logger.info("offline W1: %s", reference)
    checks = {"burst_fraction_of_offline": round(burst["out_tok_per_s"] / reference["out_tok_per_s"], 3),
              "ttft_p99_ms_target": 150, "chunk_gap_p99_ms_target": round(2 * reference["ms_per_step"], 2)}
    detail = {"shape": W1_SHAPE if args.device == "cuda" else "SmolLM2-135M", "burst_requests": args.num_prompts,
              "poisson_requests": args.poisson_requests, "client": "openai AsyncOpenAI, streamed completions",
              "client_processes": args.clients, "max_num_seqs": args.max_num_seqs, "output_scale": args.output_scale}
    path = write_result("W6", args.device, {"burst": burst, "poisson": poisson, **checks},
                        {"offline_wde_W1": reference},
                        peer_error="the peer here is wde's own offline run (LLM.generate, same process, same prompts), "
                                   "which the issue's targets compare against",
                        workload_detail=detail)
    print(f"\nW6 serving ({path.name})\n  offline W1: {reference['out_tok_per_s']:,.1f} out tok/s, "
          f"{reference['ms_per_step']} ms/step\n  burst:      {burst['out_tok_per_s']:,.1f} out tok/s "
          f"({checks['burst_fraction_of_offline']:.0%} of offline), TTFT p50/p99 {burst['ttft_ms_p50']}/"
          f"{burst['ttft_ms_p99']} ms\n  poisson {poisson['rate_req_per_s']} req/s: {poisson['out_tok_per_s']:,.1f} "
          f"out tok/s, TTFT p50/p99 {poisson['ttft_ms_p50']}/{poisson['ttft_ms_p99']} ms, chunk gap p50/p99 "
          f"{poisson['chunk_gap_ms_p50']}/{poisson['chunk_gap_ms_p99']} ms (target p99 <= "
          f"{checks['chunk_gap_p99_ms_target']}), {poisson['tokens_per_chunk']} tokens per chunk")


if __name__ == "__main__":
    main()
