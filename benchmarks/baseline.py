"""Workload W2 of GUIDE.md, as light-vllm's benchmarks/baseline ran it: Qwen2.5-7B shape (random bf16 weights),
1000 requests of 512 random prompt tokens, 512 output tokens each (EOS ignored, greedy). W7 is the same on
Qwen3-30B-A3B's shape, a mixture of experts.

    python -m benchmarks.baseline
    python -m benchmarks.baseline --tensor-parallel-size 2          # the same over two GPUs
    python -m benchmarks.baseline --shape llama-3.1-8b --tensor-parallel-size 4
    python -m benchmarks.baseline --shape qwen3-30b-a3b --peer-requests 64     # W7

For a mixture of experts, also the decode step at max_num_seqs sequences (that many requests of 512 tokens,
DECODE_PROBE_TOKENS out) against its limit: the weights it reads (the experts its tokens pick) and the KV cache.

Prints `Throughput: X requests/s, Y tokens/s, Delay Z ms` (tokens: prompt + output; Delay: the mean step time)
for wde, then the transformers peer on 128 requests (its continuous batching; benchmarks/peer.py).
"""
import argparse
import logging

import torch

from benchmarks.engine_runs import (add_async_scheduling_flag, add_fp8_flags, fp8_settings, median_run, peer_figures,
                                    spread, timed_generate, traced_generate, warm_up)
from benchmarks.model_folder import model_folder
from benchmarks.results_io import print_table, write_result
from benchmarks.roofline import decode_step_cost, generation_cost, model_sizes, print_roofline, roofline
from benchmarks.workloads import W2_SHAPE, W7_SHAPE, w2

logger = logging.getLogger("benchmarks")
PROMPT_LEN = OUTPUT_LEN = 512
DECODE_PROBE_TOKENS = 64


def decode_step(llm, shape_name: str, batch: int) -> dict:
    """The mean time of the steps that decode `batch` sequences at once (nothing admitted beside them), and the
    fraction of the step's limit it is."""
    from wde import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=DECODE_PROBE_TOKENS, ignore_eos=True)] * batch
    buckets = traced_generate(llm, w2(batch, PROMPT_LEN, seed=1), params)
    steps = buckets[max(buckets, key=lambda key: buckets[key]["steps"] if key.startswith("decode") else -1)]
    context = PROMPT_LEN + DECODE_PROBE_TOKENS // 2
    limit = roofline(decode_step_cost(shape_name, batch, context), 1, "steps/s", 1000 / steps["ms_per_step"])
    logger.info("decode steps of %d sequences: %.2f ms, limit %.2f ms (%.0f%%)", batch, steps["ms_per_step"],
                1000 / limit["limit"], 100 * limit["fraction"])
    return {"batch": batch, "context_len": context, "steps": steps["steps"], "ms_per_step": steps["ms_per_step"],
            "limit_ms": round(1000 / limit["limit"], 2), "fraction": limit["fraction"], "bytes": limit["bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default=W2_SHAPE, help="a model shape in benchmarks/model_shapes")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--peer-requests", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--runs", type=int, default=3)
    add_async_scheduling_flag(parser)
    add_fp8_flags(parser)
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from wde import LLM, SamplingParams
    prompts = w2(args.num_requests, PROMPT_LEN)
    fp8_engine, fp8_suffix, value_bytes = fp8_settings(args)
    llm = LLM(model=model_folder(args.shape), load_format="dummy", dtype="bfloat16", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, tensor_parallel_size=args.tensor_parallel_size,
              async_scheduling=args.async_scheduling, **fp8_engine)
    warm_up(llm, prompts)
    params = [SamplingParams(temperature=0, max_tokens=OUTPUT_LEN, ignore_eos=True)] * len(prompts)
    runs = []
    for _ in range(args.runs):
        run = timed_generate(llm, prompts, params)
        runs.append(run)
        print(f"Throughput: {len(prompts) / run.seconds:.2f} requests/s, "
              f"{(run.in_tokens + run.out_tokens) / run.seconds:.2f} tokens/s, "
              f"Delay {1000 * run.seconds / run.steps:.2f} ms", flush=True)
    best = median_run(runs)
    wde = {"req_per_s": round(len(prompts) / best.seconds, 2),
           "tok_per_s": round((best.in_tokens + best.out_tokens) / best.seconds),
           "delay_ms": round(1000 * best.seconds / best.steps, 2), "host_ms_per_step": round(best.host_ms_per_step, 2),
           "runs_req_per_s": spread(runs, lambda r: len(prompts) / r.seconds), "seconds": round(best.seconds, 1)}
    if model_sizes(args.shape).num_experts:
        wde["decode_step"] = decode_step(llm, args.shape, args.max_num_seqs)
    async_scheduling = llm.engine.config.args.async_scheduling
    llm.close()
    del llm
    # the limit of one GPU's share: the FLOPs and bytes divide over the tensor-parallel ranks
    cost = [c / args.tensor_parallel_size for c in generation_cost(
        args.shape, [PROMPT_LEN] * len(prompts), [OUTPUT_LEN] * len(prompts), args.max_num_seqs, **value_bytes)]
    limit = roofline(cost, len(prompts), "req/s", wde["req_per_s"])

    def measure_peer() -> dict:
        from benchmarks.peer import continuous_batching
        result = continuous_batching(args.shape, w2(args.peer_requests, PROMPT_LEN), OUTPUT_LEN)
        return {"req_per_s": round(result["requests"] / result["seconds"], 2),
                "tok_per_s": round((result["requests"] * PROMPT_LEN + result["out_tokens"]) / result["seconds"]),
                **result, "runs": 1}
    peer, peer_error = peer_figures(args.no_peer, measure_peer)
    detail = {"shape": args.shape, "tensor_parallel_size": args.tensor_parallel_size,
              "gpus": args.tensor_parallel_size, "weights": "random bf16", "num_requests": args.num_requests,
              "peer_requests": args.peer_requests, "prompt_len": PROMPT_LEN, "output_len": OUTPUT_LEN,
              "max_num_seqs": args.max_num_seqs, "async_scheduling": async_scheduling, "runs": args.runs,
              "statistic": "median", **fp8_engine}
    workload = {W2_SHAPE: "W2", W7_SHAPE: "W7"}.get(args.shape, f"W2-{args.shape}") + fp8_suffix
    if args.tensor_parallel_size > 1:
        workload += f"-tp{args.tensor_parallel_size}"
    path = write_result(workload, "cuda", wde, peer, peer_error, workload_detail=detail, roofline=limit)
    print_table(f"{workload} ({torch.cuda.get_device_name(0)})", "requests/s", wde["req_per_s"],
                peer["req_per_s"] if peer else None)
    print_roofline(limit)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
