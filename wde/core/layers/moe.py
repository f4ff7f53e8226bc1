"""Mixture-of-experts feed-forward: a router picks top_k experts for each token, their gated MLPs run, and
their outputs are summed with the routing weights (plus, for Qwen2-MoE, a shared expert every token takes).

On the GPU the experts run as two grouped matmuls (kernels/fused_moe.py); on the CPU, and as the kernels'
reference, expert by expert in torch, as transformers does. With tensor parallelism each rank holds a slice of
every expert's intermediate dimension (the gate/up rows and down columns of that slice), so a token's experts
are all computed on every rank and the partial outputs summed by one all-reduce. With expert parallelism
(enable_expert_parallel) each rank holds whole experts, a share of them, and computes only the choices of its
own experts. No all-to-all moves the tokens to their experts' ranks: under tensor parallelism every rank has
every token's hidden state already, so the same all-reduce sums what each rank's experts gave.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wde.core.layers.activation import SiluAndMul
from wde.core.layers.linear import Linear, default_weight_loader, narrow
from wde.core.layers.mlp import GatedMLP
from wde.core.parallel.distributed import all_reduce, get_expert_parallel, shard_range

if torch.cuda.is_available():  # Triton comes with CUDA builds of torch
    from wde.core.kernels.fused_moe import fused_experts


@dataclass(frozen=True)
class Routing:
    top_k: int
    renormalize: bool  # the top_k weights scaled to sum to 1 (Mixtral always; Qwen MoE when norm_topk_prob)
    scoring: str = "softmax"  # or "sigmoid" (each expert's score independent of the others')

    def __post_init__(self):
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown router scoring {self.scoring!r} (softmax or sigmoid)")


def route(router_logits: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """[tokens, experts] logits -> (weights [tokens, top_k] float32, expert ids [tokens, top_k])."""
    logits = router_logits.float()
    scores = logits.softmax(-1) if routing.scoring == "softmax" else logits.sigmoid()
    weights, ids = scores.topk(routing.top_k, dim=-1)
    if routing.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def local_expert_ids(ids: torch.Tensor, first_expert: int, num_local: int) -> torch.Tensor:
    """Expert parallelism: global expert ids -> this rank's (0..num_local-1), num_local for another rank's."""
    local = ids - first_expert
    return local.masked_fill((local < 0) | (local >= num_local), num_local)


def experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor, remote_choices: bool = False) -> torch.Tensor:
    """sum over a token's k choices of weight * down(silu(gate(x)) * up(x)) of that expert, expert by expert;
    with `remote_choices`, ids equal to the number of experts here are another rank's and add nothing."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for expert in ids.unique().tolist():
        if remote_choices and expert == w13.shape[0]:
            continue
        tokens, choice = torch.where(ids == expert)
        hidden = SiluAndMul()(F.linear(x[tokens], w13[expert]))
        expert_out = F.linear(hidden, w2[expert]) * weights[tokens, choice, None].to(x.dtype)
        out.index_add_(0, tokens, expert_out.float())
    return out.to(x.dtype)


class FusedMoE(nn.Module):
    """The experts' weights stacked, [experts, 2 * intermediate (gate | up), hidden] and [experts, hidden,
    intermediate]: this rank's slice of every expert's intermediate dimension, or (expert parallelism) this
    rank's experts whole; the router's logits in, the routed sum out."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, routing: Routing):
        super().__init__()
        if not 0 < routing.top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={routing.top_k}: a token takes 1 to {num_experts} experts "
                             f"(the number of experts)")
        self.routing, self.intermediate_size = routing, intermediate_size
        self.expert_parallel = get_expert_parallel()
        if self.expert_parallel:  # at least one expert a rank: checked before the ranks start (check_can_split)
            (self.first_expert, experts), (self.shard_start, local) = shard_range(num_experts), (0, intermediate_size)
        else:
            (self.first_expert, experts), (self.shard_start, local) = (0, num_experts), shard_range(intermediate_size)
        self.w13 = nn.Parameter(torch.empty(experts, 2 * local, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(experts, hidden_size, local), requires_grad=False)
        self.w13.shard_ids = tuple((e, part) for e in range(num_experts) for part in ("gate", "up"))
        self.w2.shard_ids = tuple((e, "down") for e in range(num_experts))
        self.w13.weight_loader = self.w2.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded, shard: tuple[int, str]) -> None:
        """Part `shard[1]` of expert `shard[0]`: this rank's slice of its intermediate dimension (rows of gate
        and up, columns of down), or all of it for an expert of this rank (nothing for another rank's)."""
        if shard not in param.shard_ids:
            raise KeyError(f"no expert part {shard!r} in this layer's {len(self.w2.shard_ids)} experts")
        expert, part = shard[0] - self.first_expert, shard[1]
        if not 0 <= expert < param.shape[0]:
            return  # another rank's expert
        local, full = self.w2.shape[2], self.intermediate_size
        if part == "down":
            default_weight_loader(param.data[expert], narrow(loaded, 1, self.shard_start, local, full))
        else:
            rows = param.data[expert].narrow(0, 0 if part == "gate" else local, local)
            default_weight_loader(rows, narrow(loaded, 0, self.shard_start, local, full))

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = route(router_logits, self.routing)
        if self.expert_parallel:
            ids = local_expert_ids(ids, self.first_expert, self.w13.shape[0])
        run = fused_experts if x.is_cuda else experts_reference
        return all_reduce(run(x, self.w13, self.w2, weights, ids, self.expert_parallel))


class SparseMoeBlock(nn.Module):
    """Router, experts and an optional shared expert whose output a sigmoid gate scales (Qwen2-MoE)."""

    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int, routing: Routing,
                 hidden_act: str = "silu", shared_intermediate_size: int = 0):
        super().__init__()
        if hidden_act != "silu":  # what the experts' fused kernel computes
            raise ValueError(f"hidden_act {hidden_act!r} is not supported for experts (only silu)")
        self.gate = Linear(hidden_size, num_experts)  # whole on every rank: each routes all its tokens
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size, routing)
        self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size) if shared_intermediate_size else None
        self.shared_expert_gate = Linear(hidden_size, 1) if shared_intermediate_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


# a checkpoint's expert tensors: Qwen's names (gate_proj / up_proj / down_proj) and Mixtral's (w1 / w3 / w2)
_EXPERT_TENSOR = re.compile(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_PARTS = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def expert_param(name: str) -> tuple[str, tuple[int, str]] | None:
    """'....experts.3.gate_proj.weight' -> ('....experts.w13', (3, 'gate')); None for other tensors."""
    match = _EXPERT_TENSOR.search(name)
    if not match:
        return None
    expert, part = int(match.group(1)), _PARTS[match.group(2)]
    return name[:match.start()] + (".experts.w2" if part == "down" else ".experts.w13"), (expert, part)
