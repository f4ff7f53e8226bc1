"""RMSNorm in one pass, with the residual add folded in: x + residual is read once, written once.

Rounding follows transformers: the sum is rounded to the input dtype, the norm is computed in float32 and
rounded back before the weight multiplies it.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / hidden + eps)
    weight = tl.load(weight_ptr + cols, mask=mask)
    tl.store(out_ptr + row * stride_o + cols, weight * (x32 * rstd).to(x.dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor:
    """norm(x) over the last dim; with `residual`, norm(x + residual) and `residual` becomes x + residual."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    out = torch.empty_like(x2)
    if x2.shape[0]:
        residual2 = residual.view(-1, hidden) if residual is not None else x2
        _rms_norm_kernel[(x2.shape[0],)](x2, residual2, weight, out, x2.stride(0), residual2.stride(0),
                                         out.stride(0), hidden, eps, HAS_RESIDUAL=residual is not None,
                                         BLOCK=triton.next_power_of_2(hidden))
    return out.view(x.shape)
