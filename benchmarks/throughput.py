"""Generation throughput, wde against transformers in the same run.

    python -m benchmarks.throughput                  # GPU: workload W1 of GUIDE.md
    python -m benchmarks.throughput --shape gemma-2-2b   # GPU: W1's requests on another shape (W1-gemma-2-2b)
    python -m benchmarks.throughput --device cpu     # CPU: SmolLM2-135M (.gguf), 32 prompts

W1: Qwen3-0.6B shape (random bf16 weights), 256 requests, prompt U[100, 1024], output U[100, 1024] (seed 0),
EOS ignored, greedy. The peer is transformers' continuous batching (benchmarks/peer.py).
CPU: 32 prompts of random ids, U[16, 128] long (seed 0), 64 output tokens each, float32; the peer is
transformers' `generate` on the same .gguf file, all prompts in one left-padded batch.
Metric: output tokens per wall-clock second, the median of --runs runs (the peer: one run).
--structured-outputs (GPU): W1 again in the same process with every request held to a JSON schema it cannot
complete within its max_tokens (an array of at least UNENDING_ITEMS integers), so the outputs keep W1's lengths
and the figure is the constraint's own cost (issue 17: at most 15% below the unconstrained run). Both runs then
use a byte-level BPE vocabulary of the shape's size (benchmarks/model_folder.py), whose tokens can write JSON.
"""
import argparse
import logging
import random
import statistics
import time

import torch

from benchmarks.engine_runs import (add_async_scheduling_flag, add_fp8_flags, fp8_settings, median_run, peer_figures,
                                    profile_decode_steps, spread, timed_generate, traced_generate, warm_up)
from benchmarks.model_folder import model_folder
from benchmarks.results_io import print_table, write_result
from benchmarks.roofline import generation_cost, print_roofline, roofline
from benchmarks.workloads import W1_SHAPE, w1

logger = logging.getLogger("benchmarks")
UNENDING_ITEMS = 4096  # more integers than 1,024 tokens can write
UNENDING_SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": UNENDING_ITEMS}


def cpu_workload(num_prompts: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.randint(16, 128))] for _ in range(num_prompts)]


def run_cpu(args) -> None:
    from wde import LLM, SamplingParams
    from wde.core.config import default_model_path
    model_path = args.model or default_model_path()
    prompts = cpu_workload(args.num_prompts)
    llm = LLM(model=model_path, device="cpu", max_num_seqs=len(prompts))
    warm_up(llm, prompts)
    params = [SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)] * len(prompts)
    runs = [timed_generate(llm, prompts, params) for _ in range(args.runs)]
    wde_rate = statistics.median(r.out_tokens / r.seconds for r in runs)
    peer_rate = None if args.no_peer else run_transformers_cpu(model_path, prompts, args.output_len)
    detail = {"model": "SmolLM2-135M-Instruct Q4_1 gguf, float32", "num_prompts": args.num_prompts,
              "prompt_len": "U[16,128] seed 0", "output_len": args.output_len, "runs": args.runs,
              "statistic": "median"}
    path = write_result("cpu-smollm2", "cpu", {"out_tok_per_s": round(wde_rate, 1)},
                        {"out_tok_per_s": round(peer_rate, 1)} if peer_rate else None,
                        peer_error="skipped (--no-peer)" if args.no_peer else None, workload_detail=detail)
    print_table(f"Throughput, {detail['model']}, {args.num_prompts} prompts x {args.output_len} tokens (cpu)",
                "output tok/s", wde_rate, peer_rate)
    print(f"\nwritten to {path}")


def run_transformers_cpu(model_path: str, prompts: list[list[int]], output_len: int) -> float:
    from pathlib import Path

    from transformers import AutoModelForCausalLM
    path = Path(model_path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):  # left padding, as generate expects for decoder-only models
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    return (out.shape[1] - width) * len(prompts) / (time.perf_counter() - start)


def run_gpu(args) -> None:
    from wde import LLM, SamplingParams
    prompts, output_lens = w1(args.num_prompts)
    # structured outputs need tokens that spell JSON: both runs then on the BPE vocabulary (model_folder.py)
    tokenizer = "bpe" if args.structured_outputs else "word-level"
    fp8_engine, fp8_suffix, value_bytes = fp8_settings(args)
    llm = LLM(model=model_folder(args.shape, tokenizer), load_format="dummy", dtype="bfloat16",
              max_num_seqs=args.max_num_seqs, attention_backend=args.attention_backend,
              async_scheduling=args.async_scheduling, **fp8_engine)
    warm_up(llm, prompts)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    runs = []
    for _ in range(args.runs):
        runs.append(timed_generate(llm, prompts, params))
        logger.info("wde W1: %.0f output tok/s (%d steps, %.2f ms host per step)", runs[-1].out_tokens /
                    runs[-1].seconds, runs[-1].steps, runs[-1].host_ms_per_step)
    best = median_run(runs)
    wde = {"out_tok_per_s": round(best.out_tokens / best.seconds, 1),
           "runs_out_tok_per_s": spread(runs, lambda r: r.out_tokens / r.seconds), "out_tokens": best.out_tokens,
           "seconds": round(best.seconds, 2), "steps": best.steps, "ms_per_step": round(1000 * best.seconds /
                                                                                      best.steps, 2),
           "host_ms_per_step": round(best.host_ms_per_step, 2)}
    if args.structured_outputs:
        wde["json_schema"] = constrained_runs(llm, prompts, output_lens, args.runs, wde["out_tok_per_s"])
    if args.profile:
        wde["steps_by_batch"] = traced_generate(llm, prompts, params)
        print("steps by the number of sequences running:", wde["steps_by_batch"])
        profiled = profile_decode_steps(llm.engine, prompts)
        print(profiled.pop("table"))
        wde["decode_step_profile"] = profiled
        print("decode step profile:", profiled)
    async_scheduling = llm.engine.config.args.async_scheduling
    del llm
    limit = roofline(generation_cost(args.shape, list(map(len, prompts)), output_lens, args.max_num_seqs,
                                     **value_bytes), sum(output_lens), "out tok/s", wde["out_tok_per_s"])

    def measure_peer() -> dict:
        from benchmarks.peer import continuous_batching
        result = continuous_batching(args.shape, prompts, sum(output_lens) // len(output_lens))
        return {"out_tok_per_s": round(result["out_tokens"] / result["seconds"], 1), **result, "runs": 1}
    peer, peer_error = peer_figures(args.no_peer, measure_peer)
    detail = {"shape": args.shape, "weights": "random bf16", "tokenizer": tokenizer,
              "num_requests": args.num_prompts, "prompt_len": "U[100,1024] seed 0",
              "output_len": "U[100,1024] seed 0", "sampling": "greedy",
              "max_num_seqs": args.max_num_seqs, "async_scheduling": async_scheduling, "runs": args.runs,
              "statistic": "median", **fp8_engine}
    workload = ("W1" if args.shape == W1_SHAPE else f"W1-{args.shape}") + fp8_suffix
    path = write_result(workload, "cuda", wde, peer, peer_error, workload_detail=detail, roofline=limit)
    print_table(f"{workload} throughput ({torch.cuda.get_device_name(0)})", "output tok/s", wde["out_tok_per_s"],
                peer["out_tok_per_s"] if peer else None)
    print_roofline(limit)
    print(f"\nwritten to {path}")


def constrained_runs(llm, prompts, output_lens, num_runs: int, unconstrained_rate: float) -> dict:
    """W1 with UNENDING_SCHEMA on every request: its rate, and its fraction of the unconstrained one."""
    from wde import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                             structured_outputs={"json": UNENDING_SCHEMA}) for n in output_lens]
    # xgrammar reads the vocabulary and compiles the schema once, before anything is timed
    llm.generate(prompts[:8], [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                              structured_outputs={"json": UNENDING_SCHEMA})] * 8, use_tqdm=False)
    runs = [timed_generate(llm, prompts, params) for _ in range(num_runs)]
    best = median_run(runs)
    assert best.out_tokens == sum(output_lens), "a constrained request ended before its max_tokens"
    rate = best.out_tokens / best.seconds
    logger.info("wde W1 under a JSON schema: %.0f output tok/s, %.1f%% of unconstrained", rate,
                100 * rate / unconstrained_rate)
    return {"out_tok_per_s": round(rate, 1), "runs_out_tok_per_s": spread(runs, lambda r: r.out_tokens / r.seconds),
            "fraction_of_unconstrained": round(rate / unconstrained_rate, 3), "schema": UNENDING_SCHEMA,
            "host_ms_per_step": round(best.host_ms_per_step, 2), "steps": best.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default=W1_SHAPE, help="GPU: a model shape in benchmarks/model_shapes")
    parser.add_argument("--model", help="CPU only: model file or folder (default: the embedded SmolLM2)")
    parser.add_argument("--num-prompts", type=int, help="default: 256 (W1), 32 (cpu)")
    parser.add_argument("--output-len", type=int, default=64, help="CPU only")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--attention-backend", default="auto")
    add_async_scheduling_flag(parser)
    add_fp8_flags(parser)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="time the steps of one more run by batch size, and "
                                                                   "print a kernel profile of decode steps")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers")
    parser.add_argument("--structured-outputs", action="store_true",
                        help="GPU: also run W1 with a JSON schema on every request, in the same process")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.device == "cpu":
        args.num_prompts = args.num_prompts or 32
        run_cpu(args)
    else:
        args.num_prompts = args.num_prompts or 256
        run_gpu(args)


if __name__ == "__main__":
    main()
