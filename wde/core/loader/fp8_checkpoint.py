"""Checkpoints published with FP8 weights, read as the model dtype's weights: each float8 tensor times its scales.

Two formats are read, as their configs' `quantization_config` names them:
- `quant_method: fp8` with `weight_block_size` [rows, columns] (Qwen3-FP8, DeepSeek-V3): `X.weight` in
  float8_e4m3fn and `X.weight_scale_inv`, one float32 per block of the weight (the name notwithstanding, the
  weight is multiplied by it);
- `quant_method: compressed-tensors`, `format: float-quantized` (llm-compressor's FP8 dynamic): `X.weight` and
  `X.weight_scale`, one per output row ("channel" strategy) or one for the tensor ("tensor").
A weight's scales may come before or after it, in the same shard or another: a weight waits until its scales
came. The dequantized weight is whole, so each tensor-parallel rank reads all of it (then keeps its slice).
"""
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from transformers import PretrainedConfig

from wde.core.layers.linear import materialize


@dataclass(frozen=True)
class Fp8Format:
    scale_suffix: str  # the name of a weight's scales: "<weight name without .weight>" + this
    block: tuple[int, int] | None  # rows x columns a block scale covers; None: per row or per tensor


def fp8_format(hf_config: PretrainedConfig) -> Fp8Format | None:
    """The FP8 format of a checkpoint's config, None for an unquantized one; ValueError for a quantization wde
    cannot read, naming it."""
    quant = getattr(hf_config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
    if not isinstance(quant, dict):
        raise ValueError(f"quantization_config must be a mapping, not {quant!r}")
    method = quant.get("quant_method")
    if method is None:
        raise ValueError("quantization_config has no quant_method")
    if method == "fp8":
        if quant.get("fmt", "e4m3") != "e4m3" or quant.get("activation_scheme", "dynamic") != "dynamic":
            raise ValueError(f"an FP8 checkpoint of fmt={quant.get('fmt')!r}, activation_scheme="
                             f"{quant.get('activation_scheme')!r} is not supported (e4m3, dynamic)")
        block = quant.get("weight_block_size")
        if not isinstance(block, (list, tuple)) or len(block) != 2 or not all(
                isinstance(size, int) and size > 0 for size in block):
            raise ValueError(f"an FP8 checkpoint needs a weight_block_size of two positive sizes, not {block!r}")
        return Fp8Format(".weight_scale_inv", (int(block[0]), int(block[1])))
    if method == "compressed-tensors" and quant.get("format") == "float-quantized":
        return Fp8Format(".weight_scale", None)
    raise ValueError(f"quantization_config {method!r} ({quant.get('format', '')}) is not supported; FP8 checkpoints "
                     "load: quant_method 'fp8' (block scales) and compressed-tensors 'float-quantized'")


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """float8 weight [rows, columns] times its scales, in float32."""
    if not torch.isfinite(scale).all():
        raise ValueError("an FP8 weight's scales are not all finite")
    if weight.dim() != 2:
        raise ValueError(f"an FP8 weight of shape {tuple(weight.shape)}: expected [rows, columns]")
    rows, columns = weight.shape
    if block is not None:
        expected = (-(-rows // block[0]), -(-columns // block[1]))
        if tuple(scale.shape) != expected:
            raise ValueError(f"block scales of shape {tuple(scale.shape)} for a weight {rows} x {columns} in blocks "
                             f"of {block[0]} x {block[1]}: expected {expected}")
        scale = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :columns]
    elif scale.numel() == rows:
        scale = scale.reshape(rows, 1)
    elif scale.numel() != 1:
        raise ValueError(f"scales of shape {tuple(scale.shape)} for a weight of {rows} rows: one per row or one")
    return weight.float() * scale.float()


def dequantized_weights(weights: Iterable[tuple[str, object]], fmt: Fp8Format) -> Iterator[tuple[str, object]]:
    """The checkpoint's tensors with each float8 weight dequantized and its scales consumed; the other tensors
    (norms, embeddings, an unquantized head) as they are."""
    waiting_weights: dict[str, torch.Tensor] = {}  # base name -> float8 weight whose scales have not come yet
    waiting_scales: dict[str, torch.Tensor] = {}
    for name, loaded in weights:
        if name.endswith(fmt.scale_suffix):
            base = name[:-len(fmt.scale_suffix)]
            scale = materialize(loaded)
            if base in waiting_weights:
                yield f"{base}.weight", named(base, dequantize, waiting_weights.pop(base), scale, fmt.block)
            else:
                waiting_scales[base] = scale
        elif name.endswith((".input_scale", ".weight_zero_point")):
            continue  # static activation scales and zero points: dynamic scaling (and e4m3) needs neither
        elif name.endswith(".weight") and _dtype(loaded) == torch.float8_e4m3fn:
            base, weight = name[:-len(".weight")], materialize(loaded)
            if base in waiting_scales:
                yield name, named(base, dequantize, weight, waiting_scales.pop(base), fmt.block)
            else:
                waiting_weights[base] = weight
        else:
            yield name, loaded
    if waiting_weights or waiting_scales:
        unmatched = sorted(f"{base}.weight (no scales)" for base in waiting_weights) + sorted(
            f"{base}{fmt.scale_suffix} (no float8 e4m3 weight)" for base in waiting_scales)
        raise ValueError(f"FP8 checkpoint tensors without their pair: {', '.join(unmatched[:5])}")


def named(base: str, fn, *args):
    """fn(*args), its ValueError naming the tensor it was about."""
    try:
        return fn(*args)
    except ValueError as e:
        raise ValueError(f"{base}.weight: {e}") from e


def _dtype(loaded) -> torch.dtype:
    if isinstance(loaded, torch.Tensor):
        return loaded.dtype
    return {"F8_E4M3": torch.float8_e4m3fn}.get(loaded.get_dtype(), torch.float32)
