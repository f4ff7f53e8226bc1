"""Tiles of the fused MoE kernels for this GPU, by layer shape and number of tokens.

Each candidate of candidates() runs one whole MoE layer (fused_experts: both grouped matmuls) on random bf16
weights and uniformly routed tokens, timed in a CUDA graph as a step runs it; the fastest goes into
wde/core/kernels/fused_moe_tiles.json under this device's name (kept beside what other devices have there),
where fused_experts takes it. Each row also gives the default tiles' time, and the bytes of the experts the
tokens pick over that time against the device's measured bandwidth.

    python -m benchmarks.tune_moe                                   # Qwen3-30B-A3B and Mixtral-8x7B shapes
    python -m benchmarks.tune_moe --shapes qwen3-30b-a3b --tokens 1 64 256 --stages 3
"""
import argparse
import json
import logging

import torch

from benchmarks.model_folder import shape
from benchmarks.results_io import write_result
from benchmarks.roofline import expert_layer, measure_device
from wde.core.kernels.fused_moe import TUNED_TILES, MatmulTiles, default_tiles, fused_experts, layer_key
from wde.core.layers.linear import time_in_graph
from wde.core.layers.moe import Routing, route

logger = logging.getLogger("benchmarks")
TOKENS = (1, 2, 4, 16, 64, 256, 1024, 4096)


def candidates(num_pairs: int, num_experts: int, stages: tuple[int, ...]):
    """block_m up to twice the rows an expert gets (past that a block is mostly padding), and blocks of one pair
    (no sort) where there is at most a pair an expert, with every block_n (narrow ones give a step of few tokens
    more programs to stream the weights with), block_k, warps and pipeline depth tried."""
    rows_per_expert = num_pairs / num_experts
    for block_m in (1, 16, 32, 64, 128):
        if (block_m == 1 and rows_per_expert > 1) or (block_m > 16 and block_m > 2 * rows_per_expert):
            continue
        for block_n in (16, 32, 64) if block_m == 1 else (32, 64, 128):
            for block_k in (128, 256) if block_m == 1 else (64, 128):
                for num_warps in (4, 8):
                    for num_stages in stages:
                        yield block_m, MatmulTiles(block_n, block_k, num_warps, num_stages)


def tune_layer(experts: int, hidden: int, intermediate: int, top_k: int, tokens: int, bandwidth: float,
               stages: tuple[int, ...]) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=generator)
    w13 = torch.randn(experts, 2 * intermediate, hidden, device="cuda", dtype=torch.bfloat16, generator=generator)
    w2 = torch.randn(experts, hidden, intermediate, device="cuda", dtype=torch.bfloat16, generator=generator)
    logits = torch.randn(tokens, experts, device="cuda", generator=generator)
    weights, ids = route(logits, Routing(top_k, renormalize=True))
    touched = ids.unique().numel()
    expert_bytes = (w13[0].numel() + w2[0].numel()) * 2

    def seconds(tiles: tuple[int, MatmulTiles]) -> float:
        return time_in_graph(lambda: fused_experts(x, w13, w2, weights, ids, tiles=tiles))
    default = default_tiles(tokens * top_k, experts)
    timed = [(seconds(tiles), tiles) for tiles in candidates(tokens * top_k, experts, stages)]
    best_s, (block_m, tiles) = min(timed, key=lambda pair: pair[0])
    default_s = seconds(default)
    row = {"layer": layer_key(experts, hidden, intermediate, top_k), "tokens": tokens, "experts_touched": touched,
           "best": [block_m, tiles.block_n, tiles.block_k, tiles.num_warps, tiles.num_stages],
           "best_us": round(best_s * 1e6, 1), "default_us": round(default_s * 1e6, 1),
           "best_fraction_of_bandwidth": round(touched * expert_bytes / best_s / bandwidth, 3),
           "default_fraction_of_bandwidth": round(touched * expert_bytes / default_s / bandwidth, 3)}
    print(json.dumps(row), flush=True)
    return row


def save(rows: list[dict]) -> None:
    tables = json.loads(TUNED_TILES.read_text()) if TUNED_TILES.exists() else {}
    device = tables.setdefault(torch.cuda.get_device_name(0), {})
    for row in rows:
        device.setdefault(row["layer"], {})[str(row["tokens"])] = row["best"]
    TUNED_TILES.write_text(json.dumps(tables, indent=1, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b"])
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--stages", nargs="+", type=int, default=[3, 4], help="software pipeline depths to try")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bandwidth = measure_device().bandwidth_bytes_per_s
    rows = [tune_layer(*expert_layer(shape(name)), tokens, bandwidth, tuple(args.stages)) for name in args.shapes
            for tokens in args.tokens]
    save(rows)
    path = write_result("tune-moe", "cuda", {"rows": rows}, None, "no peer: the default tiles are the reference",
                        device_bandwidth_tb_s=round(bandwidth / 1e12, 2))
    print(f"\nwritten to {path}; tiles in {TUNED_TILES}")


if __name__ == "__main__":
    main()
