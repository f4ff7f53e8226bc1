"""Kernels of the decode step against the device's measured copy bandwidth.

Matmuls at small batches: cuBLAS (torch's F.linear) against wde's skinny matmul, for each weight of a model
shape, as bytes of weight read per second and the fraction of the bandwidth. `wde.core.layers.linear.linear`
makes the same measurement for each shape the model runs, and takes the faster.

FP8 weights (quantization="fp8"): the skinny matmul streaming the float8 weight, against the scaled matmul of
x quantized per token (wde/core/layers/fp8.py), as bytes of the float8 weight per second. At W2's prefill
(8192 tokens of Qwen2.5-7B) the matmuls are compute-bound: cuBLAS in bf16 against the FP8 path, and its two
parts (quantizing x, the scaled matmul), as TFLOP/s.

The paged decode kernel at W1's shape (Qwen3-0.6B's KV heads, 256 sequences of W1's prompt lengths) with GQA
groups of 2, 4 and 8 query heads, over a bf16 and a float8 cache: bytes of K/V read per second (the kernel's
whole job) and the fraction of the bandwidth, for the engine's tile (with --sweep: tiles of several widths, warps
and stages, each with its largest difference from the engine tile's output).

    python -m benchmarks.kernels                          # Qwen3-0.6B and Llama-3.1-8B shapes
    python -m benchmarks.kernels --sweep --rows 1         # also each width, depth and split of the skinny tiles
    python -m benchmarks.kernels --decode-only --sweep    # only the decode kernel, each of its tiles
"""
import argparse
import dataclasses
import itertools
import json
import logging

import torch
import torch.nn.functional as F
import triton

from benchmarks.model_folder import shape
from benchmarks.results_io import write_result
from benchmarks.roofline import measure_device
from wde.core.kernels.paged_decode import DecodeTile, paged_decode, split_counters
from wde.core.kernels.skinny_matmul import SkinnyTile, skinny_matmul, tile_for
from wde.core.layers.fp8 import FP8_MAX, MIN_SCALE, fp8_matmul, quantize_rows
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


def decode_tiles(sweep: bool) -> list[DecodeTile]:
    """The engine's tile (DecodeTile's defaults), and with --sweep others of several widths, warps and stages."""
    tiles = [DecodeTile()]
    if sweep:
        tiles += [DecodeTile(*choice) for choice in itertools.product((64, 128, 256), (4, 8), (2, 3))]
    return tiles


def decode_kernel_rows(bandwidth: float, cache_dtype: torch.dtype, sweep: bool, group: int) -> list[dict]:
    """The decode kernel over W1's prompts (Qwen3-0.6B's 8 KV heads of 128) with `group` query heads to a KV
    head (Qwen3-0.6B's 2; 4 and 8 for larger models) for each tile."""
    from benchmarks.workloads import w1
    config = shape("qwen3-0.6b")
    kv_heads, head_dim, block_size = config["num_key_value_heads"], config["head_dim"], 16
    prompts, _ = w1()
    lengths = [len(p) for p in prompts]
    blocks_per_seq = [-(-n // block_size) for n in lengths]
    kv_cache = torch.randn(2, sum(blocks_per_seq), block_size, kv_heads, head_dim, dtype=torch.bfloat16,
                           device="cuda").to(cache_dtype)
    table = torch.zeros(len(lengths), max(blocks_per_seq), dtype=torch.int32)
    first = 0
    for row, count in enumerate(blocks_per_seq):
        table[row, :count] = torch.arange(first, first + count)
        first += count
    table, seq_lens = table.cuda(), torch.tensor(lengths, dtype=torch.int32, device="cuda")
    query_start = torch.arange(len(lengths) + 1, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lengths), group * kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    out, counters = torch.empty_like(q), split_counters(len(lengths), kv_heads, torch.device("cuda"))
    kv_bytes = sum(lengths) * 2 * kv_heads * head_dim * kv_cache.element_size()
    reference = None
    rows = []
    for index, tile in enumerate(decode_tiles(sweep)):
        seconds = time_if_it_fits(lambda: paged_decode(q, kv_cache, out, table, seq_lens, query_start,
                                                       head_dim ** -0.5, 1, counters, tile=tile))
        reference = out.clone() if index == 0 else reference
        rows.append({"kernel": "paged_decode", "cache": str(cache_dtype), "sequences": len(lengths),
                     "group": group, "engine_tile": index == 0, **dataclasses.asdict(tile),
                     "us": microseconds(seconds), "fraction_of_bandwidth": fraction(kv_bytes, seconds, bandwidth),
                     "max_difference_from_engine_tile": None if seconds is None else
                     round(float((out.float() - reference.float()).abs().max()), 5)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def time_if_it_fits(fn) -> float | None:
    """time_in_graph(fn), or None for a choice whose tiles need more shared memory than an SM has."""
    try:
        return time_in_graph(fn)
    except triton.runtime.errors.OutOfResources:
        return None


def microseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 2)


def fraction(bytes_read: int, seconds: float | None, bandwidth: float) -> float | None:
    return None if seconds is None else round(bytes_read / seconds / bandwidth, 3)


def skinny_tiles(n: int, k: int, num_sms: int, float8_weight: bool, sweep: bool) -> dict[str, SkinnyTile]:
    """The tile the engine takes (tile_for), and with --sweep each width, depth and split of K (three stages:
    they beat four at every shape of the 2026-12-04 sweep)."""
    tiles = {"": tile_for(n, k, num_sms, float8_weight)}
    if sweep:
        widenings = (False, True) if float8_weight else (False,)
        depths = (256, 512) if float8_weight else (128, 512)
        for block_n, block_k, split_k, fp16 in itertools.product((32, 64, 128), depths, (1, 2, 4, 8), widenings):
            if split_k > 1 and (k // split_k < block_k or triton.cdiv(n, block_n) >= 2 * num_sms):
                continue  # splits of less than one step, or of a weight that already fills the GPU twice
            label = f"-n{block_n}-k{block_k}-split{split_k}{'-fp16' if fp16 else ''}"
            tiles[label] = SkinnyTile(block_n, block_k, 3, fp16, split_k)
    return tiles


def matmul_rows(shape_name: str, m: int, bandwidth: float, num_sms: int, sweep: bool) -> list[dict]:
    """Each weight of the shape at m rows: cuBLAS and the skinny matmul in bf16, the skinny matmul of the float8
    weight and the scaled matmul (the skinny matmuls at each tile of skinny_tiles)."""
    rows = []
    for name, (n, k) in weight_shapes(shape_name).items():
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        weight_q, scale = quantize_rows(weight)
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        # the scaled matmul also rounds x to float8: the two agree only roughly (tests check exact numbers)
        torch.testing.assert_close(skinny_matmul(x, weight_q, None, num_sms, scale), fp8_matmul(x, weight_q, scale,
                                   None), rtol=1.0, atol=0.5 * k ** 0.5)
        cublas = time_in_graph(lambda: F.linear(x, weight))
        scaled = time_in_graph(lambda: fp8_matmul(x, weight_q, scale, None))
        row = {"shape": shape_name, "weight": name, "n": n, "k": k, "m": m, "cublas_us": microseconds(cublas),
               "cublas_fraction_of_bandwidth": fraction(n * k * 2, cublas, bandwidth),
               "fp8_scaled_mm_us": microseconds(scaled),
               "fp8_scaled_mm_fraction_of_bandwidth": fraction(n * k, scaled, bandwidth)}
        reference = F.linear(x, weight)
        for label, tile in skinny_tiles(n, k, num_sms, False, sweep).items():
            seconds = time_if_it_fits(lambda: skinny_matmul(x, weight, None, num_sms, tile=tile))
            if seconds is not None:  # every tile timed computes the product
                torch.testing.assert_close(skinny_matmul(x, weight, None, num_sms, tile=tile), reference,
                                           rtol=2e-2, atol=2e-2 * k ** 0.5)
            row |= {f"skinny{label}_us": microseconds(seconds),
                    f"skinny{label}_fraction_of_bandwidth": fraction(n * k * 2, seconds, bandwidth)}
        reference = skinny_matmul(x, weight_q, None, num_sms, scale)
        for label, tile in skinny_tiles(n, k, num_sms, True, sweep).items():
            seconds = time_if_it_fits(lambda: skinny_matmul(x, weight_q, None, num_sms, scale, tile=tile))
            if seconds is not None:
                torch.testing.assert_close(skinny_matmul(x, weight_q, None, num_sms, scale, tile=tile), reference,
                                           rtol=2e-2, atol=2e-2 * k ** 0.5)
            row |= {f"fp8_skinny{label}_us": microseconds(seconds),
                    f"fp8_skinny{label}_fraction_of_bandwidth": fraction(n * k, seconds, bandwidth)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def prefill_matmul_rows(shape_name: str, tokens: int) -> list[dict]:
    """W2's prefill matmuls: bf16 cuBLAS against the FP8 path and its parts, in TFLOP/s."""
    from wde.core.kernels.quantize_fp8 import quantize_rows_fused
    rows = []
    for name, (n, k) in weight_shapes(shape_name).items():
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        weight_q, scale = quantize_rows(weight)
        x = torch.randn(tokens, k, dtype=torch.bfloat16, device="cuda")
        x_q, x_scale = quantize_rows_fused(x, FP8_MAX, MIN_SCALE)
        seconds = {"bf16_cublas": time_in_graph(lambda: F.linear(x, weight)),
                   "fp8_path": time_in_graph(lambda: fp8_matmul(x, weight_q, scale, None)),
                   "fp8_scaled_mm_alone": time_in_graph(lambda: torch._scaled_mm(
                       x_q, weight_q.t(), scale_a=x_scale, scale_b=scale.t(), out_dtype=torch.bfloat16)),
                   "fp8_quantize_alone": time_in_graph(lambda: quantize_rows_fused(x, FP8_MAX, MIN_SCALE))}
        flops = 2 * tokens * n * k
        row = {"shape": shape_name, "weight": name, "n": n, "k": k, "m": tokens,
               **{f"{key}_us": microseconds(t) for key, t in seconds.items()},
               **{f"{key}_tflop_s": round(flops / t / 1e12, 1) for key, t in seconds.items()
                  if key != "fp8_quantize_alone"}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["qwen3-0.6b", "llama-3.1-8b"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--decode-only", action="store_true", help="only the decode kernel's rows")
    parser.add_argument("--decode-groups", nargs="+", type=int, default=[2, 4, 8],
                        help="query heads per KV head of the decode kernel's rows")
    parser.add_argument("--sweep", action="store_true",
                        help="time the skinny matmul's widths, depths and splits of K, and the decode kernel's tiles")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bandwidth = measure_device().bandwidth_bytes_per_s
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    if not args.decode_only:
        for shape_name in args.shapes:
            for m in args.rows:
                rows += matmul_rows(shape_name, m, bandwidth, num_sms, args.sweep)
        rows += prefill_matmul_rows("qwen2.5-7b", 8192)
    for cache_dtype, group in itertools.product((torch.bfloat16, torch.float8_e4m3fn), args.decode_groups):
        rows += decode_kernel_rows(bandwidth, cache_dtype, args.sweep, group)
    path = write_result("kernels", "cuda", {"rows": rows}, None, "no peer: cuBLAS is the matmuls' reference",
                        device_bandwidth_tb_s=round(bandwidth / 1e12, 2))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
