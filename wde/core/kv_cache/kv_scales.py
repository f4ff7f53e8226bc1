"""The scales of a float8 KV cache: one per layer, K or V, and KV head; a cache entry holds value / scale.

Where they come from, decided in one place (ModelWorker.init_kv_cache):
- the checkpoint's, when it has them: `layers.N.self_attn.k_scale` / `v_scale` (compressed-tensors and
  llm-compressor), `...k_proj.k_scale` / `...v_proj.v_scale` (ModelOpt), `...kv_scale` (one for both, older
  exports), `...k_proj.output_scale` / `...v_proj.output_scale` (AutoFP8); a scalar for the layer or one per
  KV head;
- else computed: a calibration prefill of CALIBRATION_TOKENS tokens through the model, its K and V kept in the
  model's dtype, each head's amax then mapped to FP8_MAX / HEADROOM (values up to HEADROOM times past what the
  calibration saw are still stored unclipped; the rest saturate at +-448).
A cache of the model's dtype has scales of one, which no kernel reads.
"""
import logging
import re

import torch
from safetensors import safe_open

from wde.core.config import ModelConfig
from wde.core.layers.fp8 import FP8_MAX, MIN_SCALE
from wde.core.layers.linear import heads_of_rank
from wde.core.loader.safetensors_weights import safetensors_files

logger = logging.getLogger(__name__)

CALIBRATION_TOKENS = 512
HEADROOM = 4.0
# layers.N. ... then k_scale / v_scale / kv_scale, or k_proj.output_scale / v_proj.output_scale
KV_SCALE_NAME = re.compile(r"layers\.(\d+)\.(?:.*\.)?(?:(k|v|kv)_scale|(k|v)_proj\.output_scale)$")


def is_kv_scale(name: str) -> bool:
    return KV_SCALE_NAME.search(name) is not None


def checkpoint_kv_scales(model_config: ModelConfig) -> torch.Tensor | None:
    """[layers, 2 (K, V), KV heads] float32 scales of all heads from the checkpoint, None when it has none;
    ValueError naming the tensor for a scale that is not positive and finite, of the wrong size, or missing."""
    if model_config.gguf_file:
        return None
    num_layers, num_kv_heads = model_config.num_layers, model_config.num_kv_heads
    found: dict[tuple[int, int], torch.Tensor] = {}
    for file in safetensors_files(model_config.path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                match = KV_SCALE_NAME.search(name)
                if match is None:
                    continue
                layer, which = int(match.group(1)), match.group(2) or match.group(3)
                scale = per_head(name, f.get_tensor(name), num_kv_heads, layer, num_layers)
                for kv in {"k": (0,), "v": (1,), "kv": (0, 1)}[which]:
                    found[layer, kv] = scale
    if not found:
        return None
    missing = [f"layer {layer} {'KV'[kv]}" for layer in range(num_layers) for kv in (0, 1)
               if (layer, kv) not in found]
    if missing:
        raise ValueError(f"the checkpoint's KV cache scales miss {', '.join(missing[:4])}: a scale for each "
                         "layer's K and V, or none")
    return torch.stack([torch.stack([found[layer, 0], found[layer, 1]]) for layer in range(num_layers)])


def per_head(name: str, scale: torch.Tensor, num_kv_heads: int, layer: int, num_layers: int) -> torch.Tensor:
    """A checkpoint's scale as one float32 per KV head (a scalar: the same for every head)."""
    if layer >= num_layers:
        raise ValueError(f"{name}: a KV cache scale for layer {layer} of a model of {num_layers} layers")
    scale = scale.float().flatten()
    if scale.numel() == 1:
        scale = scale.expand(num_kv_heads)
    if scale.numel() != num_kv_heads:
        raise ValueError(f"{name}: {scale.numel()} KV cache scales, expected 1 or one per KV head ({num_kv_heads})")
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"{name}: a KV cache scale must be positive and finite, not {scale.tolist()}")
    return scale.clone()


def heads_of_this_rank(scales: torch.Tensor, model_config: ModelConfig) -> torch.Tensor:
    """[layers, 2, all KV heads] -> this tensor-parallel rank's KV heads."""
    _, (first, count) = heads_of_rank(model_config.num_heads, model_config.num_kv_heads)
    return scales[:, :, first:first + count]


def scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Each head's calibration amax mapped to FP8_MAX / HEADROOM (a head of zeros keeps a positive scale)."""
    return (amax.float() * HEADROOM / FP8_MAX).clamp(min=MIN_SCALE)


def log_scales(scales: torch.Tensor, source: str) -> None:
    keys, values = scales[:, 0], scales[:, 1]
    logger.info("float8 KV cache scales %s: K %.3g..%.3g, V %.3g..%.3g (per layer and KV head)", source,
                keys.min().item(), keys.max().item(), values.min().item(), values.max().item())
