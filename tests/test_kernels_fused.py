"""The fused kernels (element-wise, RoPE with the K/V store, the skinny matmul) against the torch layers they
replace on the GPU."""
import pytest
import torch

import torch.nn.functional as F

from wde.core.kernels.activation import silu_and_mul
from wde.core.kernels.rms_norm import rms_norm
from wde.core.kernels.rotary import apply_rope
from wde.core.kernels.skinny_matmul import SkinnyTile, skinny_matmul, tile_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The torch path of wde's RMSNorm (on a GPU the layer itself runs the kernel, so it cannot be the reference)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 1024])
def test_rms_norm_with_and_without_residual(dtype, hidden):
    x = torch.randn(7, hidden, device=DEVICE).to(dtype)
    residual = torch.randn(7, hidden, device=DEVICE).to(dtype)
    weight = torch.randn(hidden, device=DEVICE).to(dtype)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), reference_rms_norm(x, weight, 1e-6),
                               rtol=tolerance(dtype), atol=tolerance(dtype))
    expected_residual = x + residual
    expected = reference_rms_norm(expected_residual, weight, 1e-6)
    kernel_residual = residual.clone()
    out = rms_norm(x, weight, 1e-6, kernel_residual)
    torch.testing.assert_close(out, expected, rtol=tolerance(dtype), atol=tolerance(dtype))
    torch.testing.assert_close(kernel_residual, expected_residual)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 1536, 3000])
def test_silu_and_mul(dtype, width):
    x = torch.randn(5, 2 * width, device=DEVICE).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(x), F.silu(gate) * up, rtol=tolerance(dtype), atol=tolerance(dtype))


def torch_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_sin[positions].to(x.dtype)[:, None].chunk(2, dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (7, 1, 128), (16, 8, 128), (4, 2, 96)])
@pytest.mark.parametrize("with_norm", [False, True])
def test_rope_in_place_with_optional_head_norm(dtype, heads, kv_heads, head_dim, with_norm):
    tokens = 9
    q = torch.randn(tokens, heads, head_dim, device=DEVICE).to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim, device=DEVICE).to(dtype)
    positions = torch.randint(0, 100, (tokens,), device=DEVICE)
    angles = torch.outer(torch.arange(100.0), 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim))
    cos_sin = torch.cat([angles.cos(), angles.sin()], -1).to(DEVICE)
    q_weight = torch.randn(head_dim, device=DEVICE).to(dtype)
    k_weight = torch.randn(head_dim, device=DEVICE).to(dtype)
    expected_q, expected_k = q, k
    if with_norm:
        expected_q = reference_rms_norm(q, q_weight, 1e-6)
        expected_k = reference_rms_norm(k, k_weight, 1e-6)
    expected_q, expected_k = torch_rope(expected_q, positions, cos_sin), torch_rope(expected_k, positions, cos_sin)
    apply_rope(q, k, positions, cos_sin, q_weight if with_norm else None, k_weight if with_norm else None, 1e-6)
    torch.testing.assert_close(q, expected_q, rtol=tolerance(dtype), atol=tolerance(dtype))
    torch.testing.assert_close(k, expected_k, rtol=tolerance(dtype), atol=tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (16, 8, 128), (4, 2, 96)])
@pytest.mark.parametrize("with_norm", [False, True])
def test_rope_with_the_kv_store_folded_in(dtype, heads, kv_heads, head_dim, with_norm):
    """q rotated in place; the rotated k and v written to their cache slots (padding rows: nowhere), k kept."""
    tokens, block_size = 5, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)  # strided views, as
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)  # the layer has
    q, k, v = (x.view(tokens, -1, head_dim) for x in (q, k, v))
    positions = torch.tensor([3, 0, 7, 1, 2], device=DEVICE)
    slots = torch.tensor([9, -1, 0, 15, 4], device=DEVICE)
    angles = torch.outer(torch.arange(8.0), 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim))
    cos_sin = torch.cat([angles.cos(), angles.sin()], -1).to(DEVICE)
    q_weight = torch.randn(head_dim, device=DEVICE).to(dtype) if with_norm else None
    k_weight = torch.randn(head_dim, device=DEVICE).to(dtype) if with_norm else None
    expected_q, expected_k = q.clone(), k.clone()
    if with_norm:
        expected_q = reference_rms_norm(q, q_weight, 1e-6)
        expected_k = reference_rms_norm(k, k_weight, 1e-6)
    expected_q, expected_k = torch_rope(expected_q, positions, cos_sin), torch_rope(expected_k, positions, cos_sin)
    k_before = k.clone()
    kv_cache = torch.zeros(2, 4, block_size, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    apply_rope(q, k, positions, cos_sin, q_weight, k_weight, 1e-6, v, kv_cache, slots)
    torch.testing.assert_close(q, expected_q, rtol=tolerance(dtype), atol=tolerance(dtype))
    assert torch.equal(k, k_before)
    flat = kv_cache.view(2, -1, kv_heads, head_dim)
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            torch.testing.assert_close(flat[0, slot], expected_k[token], rtol=tolerance(dtype), atol=tolerance(dtype))
            assert torch.equal(flat[1, slot], v[token])
    written = sorted((flat[0].abs().sum(dim=(1, 2)) > 0).nonzero()[:, 0].tolist())
    assert written == sorted(s for s in slots.tolist() if s >= 0)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [torch.float32]))
@pytest.mark.parametrize("m,n,k", [(1, 48, 64), (3, 100, 200), (16, 257, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_matmul(dtype, m, n, k, with_bias):
    """Ragged edges on every side: rows below 16, columns and K not multiples of the tiles, a strided x."""
    x = torch.randn(m, 2 * k, device=DEVICE).to(dtype)[:, :k]
    weight = torch.randn(n, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if with_bias else None
    out = skinny_matmul(x, weight, bias, num_sms=4)
    expected = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
    torch.testing.assert_close(out.double(), expected, rtol=tolerance(dtype), atol=tolerance(dtype) * k ** 0.5)


@pytest.mark.parametrize("split_k", [2, 3, 8])  # 8 splits of K=200 by 64: splits 4 to 7 have no K at all
@pytest.mark.parametrize("m,n,k", [(1, 48, 200), (16, 100, 200)])
def test_skinny_matmul_split_over_k(m, n, k, split_k):
    """Each column tile's K over split_k programs: the last to finish adds the partials, scales and biases;
    twice, since each launch must leave the counters zeroed for the next."""
    from wde.core.kernels import skinny_matmul as module
    from wde.core.layers.fp8 import quantize_rows
    x = torch.randn(m, k, device=DEVICE).to(torch.float16)
    weight, scale = quantize_rows(torch.randn(n, k, device=DEVICE) * 3)
    bias = torch.randn(n, device=DEVICE).to(torch.float16)
    expected = x.double() @ (weight.double() * scale.double()).T + bias.double()
    for _ in range(2):
        out = skinny_matmul(x, weight, bias, num_sms=4, weight_scale=scale, tile=SkinnyTile(32, 64, split_k=split_k))
        torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2 * k ** 0.5)
        assert not module.split_counters(1, x.device).any()
    plain = x.double() @ weight.double().T  # a float16 weight, split too
    out = skinny_matmul(x, weight.to(torch.float16), None, num_sms=4, tile=SkinnyTile(32, 64, split_k=split_k))
    torch.testing.assert_close(out.double(), plain, rtol=1e-2, atol=1e-2 * k ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("m,n,k", [(1, 48, 64), (5, 100, 200)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("fp16_products", [False, True])
def test_skinny_matmul_of_a_float8_weight(dtype, m, n, k, with_bias, fp16_products):
    """quantization="fp8": the float8 weight widened exactly and its rows scaled; x as it is, or (the widest
    tiles') in fp16 after a shift by 2^-8, which keeps both large values of x and small ones."""
    from wde.core.layers.fp8 import quantize_rows
    x = torch.randn(m, k, device=DEVICE)
    x[0, :3] = torch.tensor([3e3, -1e3, 1e-4])
    x = x.to(dtype)
    weight, scale = quantize_rows(torch.randn(n, k, device=DEVICE) * 3)
    bias = torch.randn(n, device=DEVICE).to(dtype) if with_bias else None
    tile = SkinnyTile(32, 64, fp16_products=fp16_products)
    out = skinny_matmul(x, weight, bias, num_sms=4, weight_scale=scale, tile=tile)
    expected = x.double() @ (weight.double() * scale.double()).T + (bias.double() if with_bias else 0)
    torch.testing.assert_close(out.double(), expected, rtol=tolerance(dtype), atol=tolerance(dtype) * k ** 0.5)


@pytest.mark.parametrize("kv_scales", [None, [[0.01, 2.0], [1.5, 0.25]]])  # none given: ones
def test_rope_stores_k_and_v_into_a_float8_cache(kv_scales):
    """kv_cache_dtype="fp8": the rotated k and v over their head's scale, rounded to float8 as torch rounds them
    (saturating at 448)."""
    tokens, heads, kv_heads, head_dim, block_size = 3, 4, 2, 64, 4
    q = torch.randn(tokens, heads, head_dim, device=DEVICE)
    k = torch.randn(tokens, kv_heads, head_dim, device=DEVICE)
    v = torch.randn(tokens, kv_heads, head_dim, device=DEVICE) * 300  # some past float8's largest value
    positions, slots = torch.tensor([0, 5, 2], device=DEVICE), torch.tensor([1, 6, 3], device=DEVICE)
    angles = torch.outer(torch.arange(8.0), 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim))
    cos_sin = torch.cat([angles.cos(), angles.sin()], -1).to(DEVICE)
    expected_k = torch_rope(k, positions, cos_sin)
    kv_cache = torch.zeros(2, 2, block_size, kv_heads, head_dim, dtype=torch.float8_e4m3fn, device=DEVICE)
    scales = torch.tensor(kv_scales or [[1.0, 1.0], [1.0, 1.0]], device=DEVICE)
    apply_rope(q, k, positions, cos_sin, None, None, 0.0, v, kv_cache, slots,
               None if kv_scales is None else scales)
    flat = kv_cache.view(2, -1, kv_heads, head_dim).float()
    as_float8 = lambda x, s: (x / s[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).float()  # noqa: E731
    for token, slot in enumerate(slots.tolist()):  # (below 2^-6, float8's subnormals, one step of 2^-9 apart)
        assert torch.allclose(flat[1, slot], as_float8(v[token], scales[1]), rtol=0, atol=2 ** -9)
        # the rotation's own float32 rounding may move a value across a float8 rounding edge: one step at most
        assert torch.allclose(flat[0, slot], as_float8(expected_k[token], scales[0]), rtol=0.13, atol=1e-2)


@pytest.mark.parametrize("k", [64, 100, 3000])  # one tile, a ragged tile, several tiles
def test_quantize_rows_fused_gives_torchs_float8_rows_and_scales(k):
    from wde.core.kernels.quantize_fp8 import quantize_rows_fused
    from wde.core.layers.fp8 import FP8_MAX, MIN_SCALE, quantize_rows
    x = torch.randn(5, k, device=DEVICE) * torch.tensor([1.0, 1e3, 1e-4, 0.0, 30.0], device=DEVICE)[:, None]
    x[4, k // 2] = -5e4  # one outlier sets its row's scale (and fits float16)
    for dtype in (torch.float32, torch.float16):
        ours, our_scale = quantize_rows_fused(x.to(dtype), FP8_MAX, MIN_SCALE)
        theirs, their_scale = quantize_rows(x.to(dtype))
        assert torch.equal(our_scale, their_scale)
        assert torch.equal(ours.float(), theirs.float())  # the same values (a -0 may come out as 0)


def test_narrow_weights_split_k_and_wide_ones_do_not():
    """tile_for's splits (132 SMs, an H100's or H200's): float8 Llama-3.1-8B's down_proj 4 ways in 128-column
    tiles, its gate_up (224 tiles) unsplit; bf16 Qwen3-0.6B's o_proj 4 ways, Llama-3.1-8B's down_proj (K 14,336)
    and Qwen3-0.6B's qkv_proj (K 1,024) unsplit."""
    assert tile_for(4096, 14336, 132, True) == SkinnyTile(128, 256, 3, True, 4)
    assert tile_for(28672, 4096, 132, True).split_k == 1
    assert tile_for(1024, 2048, 132, True) == SkinnyTile(32, 256, 3, True, 4)
    assert tile_for(1024, 2048, 132, False) == SkinnyTile(32, 128, 3, False, 4)
    assert tile_for(4096, 14336, 132, False).split_k == 1 and tile_for(4096, 1024, 132, False).split_k == 1
