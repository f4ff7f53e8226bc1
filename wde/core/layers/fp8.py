"""FP8 (e4m3) linear layers: weights quantized per output channel at load, activations per token at each call.

`quantization="fp8"` turns the projections of a loaded model (attention's q/k/v and output, the MLP's gate/up
and down: the column- and row-parallel linears; not the embeddings, the LM head, a router or the experts of a
mixture) into layers that hold float8 weights and a float32 scale per output row.
On a GPU the matmul is torch._scaled_mm with row-wise scales: each token's row of x scaled by its own amax
(dynamic), each weight row by its scale. On a CPU the same numbers are computed by the reference path: x and
the weight rounded to float8 as the GPU rounds them, then dequantized and multiplied in float32. Each
tensor-parallel rank quantizes its own slice of a weight, so the scales shard with the weights.
"""
import torch
from torch import nn

if torch.cuda.is_available():  # Triton comes with CUDA builds of torch
    from wde.core.kernels.quantize_fp8 import quantize_rows_fused

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
MIN_SCALE = 1e-12  # a row of zeros keeps a finite scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 rows of x, float32 scale [rows, 1]): each row divided by its amax / 448."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def scaled_mm_takes(weight: torch.Tensor) -> bool:
    """cuBLAS's float8 matmul needs both sides of the weight a multiple of 16 (a tensor-parallel slice may not
    be); the others take the reference path."""
    return weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.Tensor:
    """x [tokens, in] (bf16 / fp16 / fp32) times the float8 weight [out, in] with its scales [out, 1]."""
    if x.is_cuda and scaled_mm_takes(weight):
        one_pass = x.dim() == 2 and x.stride(1) == 1
        x_q, x_scale = quantize_rows_fused(x, FP8_MAX, MIN_SCALE) if one_pass else quantize_rows(x)
        # cuBLAS's row-wise scaled matmul writes bf16 only; another dtype (and its bias) converts around it
        if x.dtype == torch.bfloat16:
            return torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=weight_scale.t(), bias=bias,
                                    out_dtype=torch.bfloat16)
        out = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=weight_scale.t(),
                               out_dtype=torch.bfloat16).to(x.dtype)
        return out if bias is None else out + bias
    x_q, x_scale = quantize_rows(x)
    out = (x_q.float() * x_scale) @ (weight.float() * weight_scale).t()
    return (out if bias is None else out + bias.float()).to(x.dtype)


def quantize_linears(model: nn.Module) -> int:
    """The projections of `model` to FP8 weights, in place; returns how many."""
    from wde.core.layers.linear import MergedColumnParallelLinear, RowParallelLinear
    count = 0
    for module in model.modules():
        if isinstance(module, (MergedColumnParallelLinear, RowParallelLinear)) and module.weight_scale is None:
            weight, scale = quantize_rows(module.weight.data)
            module.weight = nn.Parameter(weight, requires_grad=False)
            module.weight_scale = nn.Parameter(scale, requires_grad=False)
            count += 1
    return count
