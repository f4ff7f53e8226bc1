"""Kernels of the decode step against the device's measured copy bandwidth.

Matmuls at small batches: cuBLAS (torch's F.linear) against wde's skinny matmul, for each weight of a model
shape, as bytes of weight read per second and the fraction of the bandwidth. `wde.core.layers.linear.linear`
makes the same measurement for each shape the model runs, and takes the faster.

The paged decode kernel at W1's shape (Qwen3-0.6B's heads, 256 sequences of W1's prompt lengths), for a few
context tiles: bytes of K/V read per second (the kernel's whole job) and the fraction of the bandwidth.

    python -m benchmarks.kernels                          # Qwen3-0.6B and Llama-3.1-8B shapes
"""
import argparse
import json
import logging

import torch
import torch.nn.functional as F

from benchmarks.model_folder import shape
from benchmarks.results_io import write_result
from benchmarks.roofline import measure_device
from wde.core.kernels.skinny_matmul import skinny_matmul
from wde.core.layers.linear import time_in_graph

logger = logging.getLogger("benchmarks")


def weight_shapes(shape_name: str) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of each distinct matmul of one decoder layer, and the LM head."""
    config = shape(shape_name)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden), "o": (hidden, heads * head_dim),
            "gate_up": (2 * inter, hidden), "down": (hidden, inter), "lm_head": (config["vocab_size"], hidden)}


def decode_kernel_rows(bandwidth: float) -> list[dict]:
    from benchmarks.workloads import w1
    from wde.core.kernels.paged_decode import paged_decode, split_counters
    config = shape("qwen3-0.6b")
    heads, kv_heads, head_dim, block_size = (config["num_attention_heads"], config["num_key_value_heads"],
                                             config["head_dim"], 16)
    prompts, _ = w1()
    lengths = [len(p) for p in prompts]
    blocks_per_seq = [-(-n // block_size) for n in lengths]
    kv_cache = torch.randn(2, sum(blocks_per_seq), block_size, kv_heads, head_dim, dtype=torch.bfloat16,
                           device="cuda")
    table = torch.zeros(len(lengths), max(blocks_per_seq), dtype=torch.int32)
    first = 0
    for row, count in enumerate(blocks_per_seq):
        table[row, :count] = torch.arange(first, first + count)
        first += count
    table, seq_lens = table.cuda(), torch.tensor(lengths, dtype=torch.int32, device="cuda")
    query_start = torch.arange(len(lengths) + 1, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lengths), heads, head_dim, dtype=torch.bfloat16, device="cuda")
    out, counters = torch.empty_like(q), split_counters(len(lengths), kv_heads, torch.device("cuda"))
    kv_bytes = sum(lengths) * 2 * kv_heads * head_dim * 2
    rows = []
    for block_n in (32, 64, 128):
        seconds = time_in_graph(lambda: paged_decode(q, kv_cache, out, table, seq_lens, query_start,
                                                     head_dim ** -0.5, 1, counters, block_n=block_n))
        rows.append({"kernel": "paged_decode", "sequences": len(lengths), "block_n": block_n,
                     "us": round(seconds * 1e6, 1), "fraction_of_bandwidth": round(kv_bytes / seconds / bandwidth, 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["qwen3-0.6b", "llama-3.1-8b"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bandwidth = measure_device().bandwidth_bytes_per_s
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for shape_name in args.shapes:
        for name, (n, k) in weight_shapes(shape_name).items():
            weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
            for m in args.rows:
                x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
                cublas = time_in_graph(lambda: F.linear(x, weight))
                skinny = time_in_graph(lambda: skinny_matmul(x, weight, None, num_sms))
                torch.testing.assert_close(skinny_matmul(x, weight, None, num_sms), F.linear(x, weight), rtol=2e-2,
                                           atol=2e-2 * k ** 0.5)
                bytes_read = weight.numel() * 2
                row = {"shape": shape_name, "weight": name, "n": n, "k": k, "m": m,
                       "cublas_us": round(cublas * 1e6, 2), "skinny_us": round(skinny * 1e6, 2),
                       "cublas_fraction_of_bandwidth": round(bytes_read / cublas / bandwidth, 3),
                       "skinny_fraction_of_bandwidth": round(bytes_read / skinny / bandwidth, 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del weight
    rows += decode_kernel_rows(bandwidth)
    path = write_result("kernels", "cuda", {"rows": rows}, None, "no peer: cuBLAS is the matmuls' reference",
                        device_bandwidth_tb_s=round(bandwidth / 1e12, 2))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
