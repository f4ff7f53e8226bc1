"""The physical limit of a workload on this device, and the fraction of it a run reached.

A workload's limit is a lower bound on its time: the fewest bytes it must move through device memory over the
device's measured bandwidth, or its matmul FLOPs over the device's measured bf16 matmul rate, whichever is
longer. Bytes: every weight once per step (decode steps read them all) and each sequence's KV cache once per
token it decodes; FLOPs: 2 per weight per token, and attention's q.k and p.v products. A mixture of experts'
step reads the experts its tokens pick, E * (1 - (1 - k/E)^B) of E for B tokens taking k each when the routing
is uniform (random weights route so); its FLOPs are those of the k experts a token takes. Both rates are measured
here, on the GPU the benchmark runs on, so the fraction is of what this device can do, not of its data sheet.

    python -m benchmarks.roofline          # prints this device's measured rates
"""
import logging
import math
from dataclasses import asdict, dataclass
from functools import cache

import torch

from benchmarks.model_folder import shape

logger = logging.getLogger("benchmarks")
BYTES_PER_VALUE = 2  # bf16 weights and KV cache


@dataclass(frozen=True)
class DeviceRates:
    bandwidth_bytes_per_s: float  # device-to-device copy: bytes read + bytes written, per second
    matmul_flop_per_s: float  # a large bf16 matmul


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: cuBLAS picks its kernel, the allocator its blocks
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    return best


@cache
def measure_device() -> DeviceRates:
    """The best of a few timed runs of a 2 GiB copy and an 8192^3 bf16 matmul."""
    source = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")
    target = torch.empty_like(source)
    copy_s = _best_seconds(lambda: target.copy_(source), 10)
    del source, target
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    matmul_s = _best_seconds(lambda: a @ b, 10)
    rates = DeviceRates(bandwidth_bytes_per_s=2 * (1 << 31) / copy_s, matmul_flop_per_s=2 * 8192 ** 3 / matmul_s)
    logger.info("device rates: %.2f TB/s copy bandwidth, %.0f TFLOP/s bf16 matmul",
                rates.bandwidth_bytes_per_s / 1e12, rates.matmul_flop_per_s / 1e12)
    return rates


@dataclass(frozen=True)
class ModelSizes:
    layer_params: int  # weights every token goes through (all layers; of a mixture of experts, its top_k experts)
    head_params: int  # the LM head (decoders) or 0; run only for rows that sample
    kv_bytes_per_token: int  # K and V of one token over all layers
    attention_width: int  # heads x head_dim: the width of q.k and p.v products per layer
    num_layers: int
    expert_params: int = 0  # a mixture of experts: the weights of one expert index over all its sparse layers
    num_experts: int = 0
    top_k: int = 0

    def step_params(self, batch: float) -> float:
        """The weights a decode step of `batch` tokens reads: all but the experts, and the experts it picks."""
        if not self.num_experts:
            return self.layer_params + self.head_params
        touched = self.num_experts * (1 - (1 - self.top_k / self.num_experts) ** batch)
        return self.layer_params + self.head_params + (touched - self.top_k) * self.expert_params


def expert_layer(config: dict) -> tuple[int, int, int, int]:
    """(experts, hidden, one expert's intermediate size, top_k) of a Qwen3-MoE / Qwen2-MoE / Mixtral shape;
    experts 0 for a dense one."""
    experts = config.get("num_experts") or config.get("num_local_experts") or 0
    intermediate = config.get("moe_intermediate_size") or config["intermediate_size"]
    return experts, config["hidden_size"], intermediate, config.get("num_experts_per_tok", 0)


def expert_sizes(config: dict, hidden: int, attention: int) -> ModelSizes | None:
    """Qwen3-MoE / Qwen2-MoE / Mixtral: (layer params with top_k experts, one expert over the sparse layers)."""
    experts, _, intermediate, top_k = expert_layer(config)
    if not experts:
        return None
    layers = config["num_hidden_layers"]
    expert = 3 * hidden * intermediate
    shared = config.get("shared_expert_intermediate_size") or 0
    sparse = [i for i in range(layers) if i not in config.get("mlp_only_layers", [])
              and (i + 1) % config.get("decoder_sparse_step", 1) == 0]
    per_sparse = attention + hidden * experts + top_k * expert + (3 * hidden * shared + hidden if shared else 0)
    per_dense = attention + 3 * hidden * config["intermediate_size"]
    return len(sparse) * per_sparse + (layers - len(sparse)) * per_dense, expert * len(sparse), experts, top_k


def model_sizes(shape_name: str) -> ModelSizes:
    config = shape(shape_name)
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    if config["model_type"] in ("bert", "xlm-roberta"):  # encoders: one FFN up, one down
        per_layer = 4 * hidden * hidden + 2 * hidden * inter
        return ModelSizes(per_layer * layers, 0, 0, heads * head_dim, layers)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, k, v, o
    layer_params, *experts = expert_sizes(config, hidden, attention) or (layers * (attention + 3 * hidden * inter),)
    return ModelSizes(layer_params, config["vocab_size"] * hidden, 2 * layers * kv_heads * head_dim * BYTES_PER_VALUE,
                      heads * head_dim, layers, *experts)


def generation_cost(shape_name: str, prompt_lens: list[int], output_lens: list[int], max_num_seqs: int,
                    weight_value_bytes: float = BYTES_PER_VALUE, kv_value_bytes: float = BYTES_PER_VALUE
                    ) -> tuple[float, float]:
    """(bytes, FLOPs) a generation workload needs at the least. Decode steps: at least the longest output, and
    at least the outputs over max_num_seqs; each reads every weight once. FP8 weights or KV: 1 byte a value."""
    sizes = model_sizes(shape_name)
    steps = max(max(output_lens), math.ceil(sum(output_lens) / max_num_seqs))
    weight_bytes = sizes.step_params(sum(output_lens) / steps) * weight_value_bytes
    # a sequence's n-th output token reads the K/V of its prompt and its n - 1 earlier outputs
    kv_reads = (sum(p * o + o * (o - 1) / 2 for p, o in zip(prompt_lens, output_lens)) * sizes.kv_bytes_per_token
                * kv_value_bytes / BYTES_PER_VALUE)
    tokens = sum(prompt_lens) + sum(output_lens)
    attention_pairs = sum(p * (p + 1) / 2 + p * o + o * (o + 1) / 2 for p, o in zip(prompt_lens, output_lens))
    flops = (2 * sizes.layer_params * tokens + 2 * sizes.head_params * sum(output_lens)
             + 4 * attention_pairs * sizes.attention_width * sizes.num_layers)
    return steps * weight_bytes + kv_reads, flops


def decode_step_cost(shape_name: str, batch: int, context_len: int) -> tuple[float, float]:
    """(bytes, FLOPs) of one decode step of `batch` sequences of `context_len` tokens each."""
    sizes = model_sizes(shape_name)
    flops = batch * (2 * (sizes.layer_params + sizes.head_params) + 4 * context_len * sizes.attention_width
                     * sizes.num_layers)
    return (sizes.step_params(batch) * BYTES_PER_VALUE + batch * context_len * sizes.kv_bytes_per_token), flops


def encoder_cost(shape_name: str, input_lens: list[int]) -> tuple[float, float]:
    """(bytes, FLOPs) of encoding each input once (bidirectional attention); the weights read once."""
    sizes = model_sizes(shape_name)
    flops = sum(2 * sizes.layer_params * n + 4 * n * n * sizes.attention_width * sizes.num_layers
                for n in input_lens)
    return sizes.layer_params * BYTES_PER_VALUE, flops


def roofline(cost: tuple[float, float], work: float, unit: str, reached: float) -> dict:
    """The limit (in `unit`: `work` over the least time `cost` allows) and the fraction `reached` is of it."""
    rates = measure_device()
    num_bytes, flops = cost
    memory_s, compute_s = num_bytes / rates.bandwidth_bytes_per_s, flops / rates.matmul_flop_per_s
    limit = work / max(memory_s, compute_s)
    result = {"limit": round(limit, 1), "unit": unit, "fraction": round(reached / limit, 3),
              "bound": "memory" if memory_s >= compute_s else "compute", "bytes": num_bytes, "flops": flops,
              "device_bandwidth_tb_s": round(rates.bandwidth_bytes_per_s / 1e12, 2),
              "device_matmul_tflop_s": round(rates.matmul_flop_per_s / 1e12)}
    logger.info("roofline: %.1f %s (%s-bound); reached %.1f, %.0f%% of it", limit, unit, result["bound"], reached,
                100 * reached / limit)
    return result


def print_roofline(result: dict) -> None:
    print(f"physical limit {result['limit']:,.1f} {result['unit']} ({result['bound']}-bound at "
          f"{result['device_bandwidth_tb_s']} TB/s, {result['device_matmul_tflop_s']} TFLOP/s measured): "
          f"{100 * result['fraction']:.0f}% reached")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(asdict(measure_device()))
