"""silu(gate) * up in one pass over the merged [gate | up] projection."""
import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, width, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0)
    gate32 = gate.to(tl.float32)
    silu = (gate32 / (1.0 + tl.exp(-gate32))).to(gate.dtype)  # rounded like torch's silu before the product
    tl.store(out_ptr + row * stride_o + cols, silu * up, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    width = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * width)
    out = torch.empty(x2.shape[0], width, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(triton.next_power_of_2(width), 1024)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(width, block))](x2, out, x2.stride(0), out.stride(0), width,
                                                                       BLOCK=block)
    return out.view(*x.shape[:-1], width)
