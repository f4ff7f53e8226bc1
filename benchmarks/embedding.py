"""Workload W3 of GUIDE.md: embeddings. BERT-base shape (random bf16 weights), 8192 inputs of U[16, 512] random
token ids (seed 1), the [CLS] vector of each (not normalized), against transformers' BertModel run as
sentence-transformers runs it (batches of 128 sorted by length, padded; benchmarks/peer.py). The result also
records transformers' best case (batches built beforehand, warmed up) beside the peer's figure.

    python -m benchmarks.embedding

Metric: inputs per second, the median of --runs runs (the peer: one run after a warm-up).
"""
import argparse
import logging
import statistics
import time

import torch

from benchmarks.engine_runs import peer_figures
from benchmarks.model_folder import model_folder
from benchmarks.results_io import print_table, write_result
from benchmarks.roofline import encoder_cost, print_roofline, roofline
from benchmarks.workloads import W3_SHAPE, w3

logger = logging.getLogger("benchmarks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-inputs", type=int, default=8192)
    parser.add_argument("--max-num-batched-tokens", type=int, default=65536)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from wde import LLM, PoolingParams
    inputs = w3(args.num_inputs)
    llm = LLM(model=model_folder(W3_SHAPE), load_format="dummy", dtype="bfloat16",
              max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
    params = PoolingParams(normalize=False)
    llm.embed(inputs[:256], params, use_tqdm=False)  # warm-up
    rates = []
    for _ in range(args.runs):
        start = time.perf_counter()
        outputs = llm.embed(inputs, params, use_tqdm=False)
        rates.append(len(inputs) / (time.perf_counter() - start))
        logger.info("wde W3: %.0f inputs/s", rates[-1])
    assert all(o.outputs is not None and o.outputs.data.shape == (768,) for o in outputs)
    times = llm.engine.get_stats().step_times
    wde = {"inputs_per_s": round(statistics.median(rates), 1), "runs_inputs_per_s": [round(r, 1) for r in rates],
           "tok_per_s": round(statistics.median(rates) * sum(map(len, inputs)) / len(inputs)),
           "host_ms_per_step": round(times.host_ms_per_step, 2),
           "attention_backend": type(llm.engine.executor.worker.attn_backend).__name__}
    del llm, outputs
    limit = roofline(encoder_cost(W3_SHAPE, list(map(len, inputs))), len(inputs), "inputs/s", wde["inputs_per_s"])

    def measure_peer() -> dict:
        from benchmarks.peer import padded_encoder
        lengths = [len(tokens) for tokens in inputs]
        return {**padded_encoder(W3_SHAPE, lengths), "runs": 1,
                "prebuilt_inputs_warmed_up": padded_encoder(W3_SHAPE, lengths, prebuilt=True)}
    peer, peer_error = peer_figures(args.no_peer, measure_peer)
    detail = {"shape": W3_SHAPE, "weights": "random bf16", "num_inputs": args.num_inputs,
              "input_len": "U[16,512] seed 1", "pooling": "CLS, not normalized",
              "max_num_batched_tokens": args.max_num_batched_tokens, "max_num_seqs": args.max_num_seqs,
              "runs": args.runs, "statistic": "median"}
    path = write_result("W3", "cuda", wde, peer, peer_error, workload_detail=detail, roofline=limit)
    print_table(f"W3 embeddings ({torch.cuda.get_device_name(0)})", "inputs/s", wde["inputs_per_s"],
                peer["inputs_per_s"] if peer else None)
    print_roofline(limit)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
