"""Generation throughput, wde against transformers in the same run.

    python -m benchmarks.throughput --device cpu     # SmolLM2-135M (.gguf), 32 prompts, float32

CPU workload: 32 prompts of random token ids, lengths U[16, 128] (seed 0), 64 output tokens each, EOS ignored.
The peer is transformers' `generate` on the same model file, all prompts in one left-padded batch.
Metric: output tokens per wall-clock second (medians of --runs runs).
"""
import argparse
import logging
import random
import statistics
import time

import torch

from benchmarks.results_io import print_table, write_result

logger = logging.getLogger("benchmarks")


def cpu_workload(num_prompts: int, output_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.randint(16, 128))] for _ in range(num_prompts)]


def run_wde(model_path: str, prompts: list[list[int]], output_len: int, runs: int) -> float:
    from wde import LLM, SamplingParams
    llm = LLM(model=model_path, device="cpu", max_num_seqs=len(prompts))
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        rates.append(sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed)
        logger.info("wde: %.1f output tok/s", rates[-1])
    return statistics.median(rates)


def run_transformers_cpu(model_path: str, prompts: list[list[int]], output_len: int, runs: int) -> float:
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
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - start
        rates.append((out.shape[1] - width) * len(prompts) / elapsed)
        logger.info("transformers: %.1f output tok/s", rates[-1])
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu"])
    parser.add_argument("--model", help="model file or folder (default: the embedded SmolLM2)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="skip transformers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from wde.core.config import default_model_path
    model_path = args.model or default_model_path()
    prompts = cpu_workload(args.num_prompts, args.output_len)
    wde_rate = run_wde(model_path, prompts, args.output_len, args.runs)
    peer_rate = None if args.no_peer else run_transformers_cpu(model_path, prompts, args.output_len, args.runs)
    workload = {"name": "cpu-smollm2", "model": "SmolLM2-135M-Instruct Q4_1 gguf, float32",
                "num_prompts": args.num_prompts, "prompt_len": "U[16,128] seed 0", "output_len": args.output_len,
                "runs": args.runs, "statistic": "median"}
    path = write_result("cpu-smollm2", args.device, {"out_tok_per_s": round(wde_rate, 1)},
                        {"out_tok_per_s": round(peer_rate, 1)} if peer_rate else None,
                        peer_error="skipped (--no-peer)" if args.no_peer else None, workload_detail=workload)
    print_table(f"Throughput, {workload['model']}, {args.num_prompts} prompts x {args.output_len} tokens "
                f"({args.device})", "output tok/s", wde_rate, peer_rate)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
