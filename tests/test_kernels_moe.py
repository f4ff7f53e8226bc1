"""The fused MoE kernels (kernels/fused_moe.py) against the torch experts of layers/moe.py, which the CPU runs and
which transformers' experts equal (test_moe_models.py): the sort by expert, and the whole routed sum."""
import pytest
import torch

from wde.core.kernels import fused_moe
from wde.core.kernels.fused_moe import MatmulTiles, fused_experts, sort_by_expert
from wde.core.layers.moe import Routing, experts_reference, local_expert_ids, route

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 8, 2, 16), (37, 8, 2, 16), (5, 64, 8, 16),
                                                         (300, 4, 2, 32), (2, 128, 8, 16)])
def test_sort_by_expert_gives_each_block_rows_of_its_expert_only(tokens, experts, top_k, block_m):
    generator = torch.Generator().manual_seed(tokens)
    ids = torch.rand(tokens, experts, generator=generator).argsort(-1)[:, :top_k].to(DEVICE)
    blocks = sort_by_expert(ids, experts, block_m)
    pairs, block_expert = blocks.sorted_pairs.cpu(), blocks.block_expert.cpu()
    flat = ids.reshape(-1).cpu()
    real = pairs[pairs < tokens * top_k]
    assert sorted(real.tolist()) == list(range(tokens * top_k))  # every pair once
    for block, expert in enumerate(block_expert.tolist()):
        rows = pairs[block * block_m:(block + 1) * block_m]
        rows = rows[rows < tokens * top_k]
        if expert == experts:  # past the used blocks: nothing left to hold
            assert len(rows) == 0
        else:
            assert len(rows) > 0 and (flat[rows] == expert).all()
    used = int((block_expert < experts).sum())
    assert used == sum(-(-int((flat == e).sum()) // block_m) for e in range(experts))


# the grouped matmuls over the sort, and the path without it (a block of one pair) that steps of a token or two take
PATHS = {"grouped": (16, MatmulTiles(64, 128, 4, 3)), "pairwise": (1, MatmulTiles(32, 128, 4, 3))}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("tokens,experts,top_k,hidden,intermediate", [
    (0, 8, 2, 64, 32), (1, 8, 2, 64, 32), (19, 8, 2, 64, 48), (70, 4, 2, 32, 64), (6, 16, 8, 64, 32),
    (1, 16, 8, 200, 40)])
def test_fused_experts_equal_the_torch_experts(dtype, tokens, experts, top_k, hidden, intermediate, path):
    generator = torch.Generator().manual_seed(tokens * experts + 1)
    x = torch.randn(tokens, hidden, generator=generator).to(DEVICE, dtype)
    w13 = (torch.randn(experts, 2 * intermediate, hidden, generator=generator) / hidden ** 0.5).to(DEVICE, dtype)
    w2 = (torch.randn(experts, hidden, intermediate, generator=generator) / intermediate ** 0.5).to(DEVICE, dtype)
    logits = torch.randn(tokens, experts, generator=generator).to(DEVICE)
    weights, ids = route(logits, Routing(top_k=top_k, renormalize=True))
    expected = experts_reference(x, w13, w2, weights, ids)
    # float32 dots run in TF32 on the GPU (10-bit mantissas), exactly in the interpreter
    tolerance = {torch.float32: 1e-4 if DEVICE == "cpu" else 5e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(fused_experts(x, w13, w2, weights, ids, tiles=PATHS[path]), expected, rtol=tolerance,
                               atol=tolerance)


def fused_pairwise(*args):
    return fused_experts(*args, tiles=PATHS["pairwise"])


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("run", [fused_experts, fused_pairwise, experts_reference], ids=["fused", "pairwise", "torch"])
def test_experts_shared_by_ranks_sum_to_all_of_them(run, ranks):
    """Expert parallelism: each rank computes the choices of its own experts only (the others' add zeros, even
    where they are all a block holds), and the ranks' sums add up to the whole layer's."""
    generator = torch.Generator().manual_seed(ranks)
    tokens, experts, top_k, hidden, intermediate = 21, 8, 2, 32, 48
    x = torch.randn(tokens, hidden, generator=generator).to(DEVICE)
    w13 = (torch.randn(experts, 2 * intermediate, hidden, generator=generator) / hidden ** 0.5).to(DEVICE)
    w2 = (torch.randn(experts, hidden, intermediate, generator=generator) / intermediate ** 0.5).to(DEVICE)
    weights, ids = route(torch.randn(tokens, experts, generator=generator).to(DEVICE), Routing(top_k, True))
    total = torch.zeros(tokens, hidden, device=DEVICE)
    bounds = torch.linspace(0, experts, ranks + 1).round().long().tolist()
    for first, end in zip(bounds, bounds[1:]):
        local = local_expert_ids(ids, first, end - first)
        assert bool(((local == end - first) == ((ids < first) | (ids >= end))).all())
        total += run(x, w13[first:end].contiguous(), w2[first:end].contiguous(), weights, local, True)
    tolerance = 1e-4 if DEVICE == "cpu" else 5e-3
    torch.testing.assert_close(total, experts_reference(x, w13, w2, weights, ids), rtol=tolerance, atol=tolerance)


def test_routing_softmax_sigmoid_and_renormalization():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, ids = route(logits, Routing(top_k=2, renormalize=False))
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, logits.softmax(-1)[:, :2])
    weights, _ = route(logits, Routing(top_k=2, renormalize=True))
    torch.testing.assert_close(weights.sum(-1), torch.ones(1))
    weights, _ = route(logits, Routing(top_k=2, renormalize=False, scoring="sigmoid"))
    torch.testing.assert_close(weights, logits.sigmoid()[:, :2])
    with pytest.raises(ValueError, match="scoring"):
        Routing(top_k=2, renormalize=True, scoring="relu")


def test_tuned_tiles_are_those_of_the_nearest_tokens_tuned_for_the_layer_shape(monkeypatch):
    """benchmarks/tune_moe.py's table, by device and layer shape: the entry of the nearest number of tokens (by
    ratio); a shape or device not tuned takes default_tiles."""
    table = {"8x64x32/2": {"1": [16, 64, 128, 4, 3], "256": [64, 128, 64, 8, 4]}}
    monkeypatch.setattr(fused_moe, "tuned_tables", lambda device_name: table if device_name == "cpu" else {})
    w13 = torch.empty(8, 64, 64)
    assert fused_moe.choose_tiles(w13, 4, top_k=2) == (16, MatmulTiles(64, 128, 4, 3))
    assert fused_moe.choose_tiles(w13, 100, top_k=2) == (64, MatmulTiles(128, 64, 8, 4))
    assert fused_moe.choose_tiles(w13, 100, top_k=4) == fused_moe.default_tiles(100 * 4, 8)
    assert fused_moe.choose_tiles(torch.empty(4, 64, 64), 100, top_k=2) == fused_moe.default_tiles(100 * 2, 4)
    table["8x64x32/2"]["2"] = [1, 32, 128, 4, 3]  # tuned to the path without the sort
    assert fused_moe.choose_tiles(w13, 2, top_k=2) == (1, MatmulTiles(32, 128, 4, 3))
    table["8x64x32/2"] = {"2": [1, 32, 128, 4, 3]}  # the only entry: never past a pair an expert
    assert fused_moe.choose_tiles(w13, 100, top_k=2) == fused_moe.default_tiles(100 * 2, 8)
