"""The fused element-wise kernels against the torch layers they replace on the GPU."""
import pytest
import torch

import torch.nn.functional as F

from wde.core.kernels.activation import silu_and_mul
from wde.core.kernels.rms_norm import rms_norm
from wde.core.kernels.rotary import apply_rope

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
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (7, 1, 128), (16, 8, 128)])
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
