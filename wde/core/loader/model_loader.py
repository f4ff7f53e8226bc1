"""Build a model for a ModelConfig and fill its parameters from the checkpoint."""
import logging
import time
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from wde.core.config import ModelConfig
from wde.core.kv_cache.kv_scales import is_kv_scale
from wde.core.layers.fp8 import quantize_linears
from wde.core.layers.linear import default_weight_loader
from wde.core.layers.norm import RMSNorm
from wde.core.loader.fp8_checkpoint import dequantized_weights, fp8_format
from wde.core.loader.gguf_weights import iterate_gguf
from wde.core.loader.safetensors_weights import iterate_safetensors
from wde.core.registry import resolve_model_class

logger = logging.getLogger(__name__)


def iterate_weights(model_config: ModelConfig) -> Iterator[tuple[str, object]]:
    """(name, tensor or lazy slice) pairs; parameters' loaders read what they keep (layers/linear.py)."""
    if model_config.gguf_file:
        return iterate_gguf(model_config.weights_path, model_config.hf_config)
    fp8 = fp8_format(model_config.hf_config)
    # a float8 KV cache's scales are the worker's to read (kv_cache/kv_scales.py), not parameters
    weights = ((name, tensor) for name, tensor in iterate_safetensors(model_config.path) if not is_kv_scale(name))
    return dequantized_weights(weights, fp8) if fp8 else weights


def load_model(model_config: ModelConfig, device: torch.device, load_format: str = "auto", seed: int = 0,
               quantization: str | None = None) -> nn.Module:
    start = time.perf_counter()
    model_class = resolve_model_class(model_config.architecture, model_config.task)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(model_config.dtype)
    try:
        with torch.device(device):
            model = model_class(model_config)
    finally:
        torch.set_default_dtype(default_dtype)
    if load_format == "dummy":
        initialize_dummy_weights(model, getattr(model_config.hf_config, "initializer_range", 0.02), seed)
    else:
        model.load_weights(iterate_weights(model_config))
    if quantization == "fp8":
        logger.info("quantization fp8: %d projections' weights to float8 per output channel",
                    quantize_linears(model))
    model.eval()
    logger.info("loaded %s (%s, %.0fM parameters, %s) on %s in %.1f s", model_config.architecture,
                "random weights" if load_format == "dummy" else model_config.weights_path,
                sum(p.numel() for p in model.parameters()) / 1e6,
                str(model_config.dtype).removeprefix("torch."), device, time.perf_counter() - start)
    return model


@torch.no_grad()
def initialize_dummy_weights(model: nn.Module, std: float, seed: int) -> None:
    """Random weights drawn on the model's device, as transformers initializes them: norm weights 1, biases 0,
    everything else normal(0, std). Benchmarks use them: a forward pass takes as long as with real weights."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, RMSNorm):
                param.fill_(1.0)
            elif name == "bias":
                param.zero_()
            else:
                param.normal_(0.0, std, generator=generator)


def load_params(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                stacked: Iterable[tuple[str, str, str]] = (),
                skip: Callable[[str], bool] = lambda name: False,
                mapped: Callable[[str], tuple[str, object] | None] = lambda name: None) -> None:
    """Copy checkpoint tensors into `module`'s parameters, then check that every parameter got its data.

    `stacked` lists (merged parameter part, checkpoint part, shard id), e.g. ("qkv_proj", "q_proj", "q"): a
    checkpoint tensor whose name holds ".q_proj." loads as shard "q" of the parameter named with ".qkv_proj.".
    `mapped` names the (parameter, shard id) of tensors that no fixed rename finds (the experts of MoE layers,
    whose shard ids hold the expert's number), None for the others.
    """
    params = dict(module.named_parameters())
    loaded: dict[str, set] = {}
    for name, tensor in weights:
        if skip(name):
            continue
        target, shard = mapped(name) or (name, None)
        for merged, part, shard_id in stacked if shard is None else ():
            if f".{part}." in name:
                target, shard = name.replace(f".{part}.", f".{merged}."), shard_id
                break
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {type(module).__name__}")
        param = params[target]
        loader = getattr(param, "weight_loader", None)
        try:
            if shard is None:
                (loader or default_weight_loader)(param, tensor)
            else:
                loader(param, tensor, shard)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot load checkpoint tensor {name!r} into {target!r}: {e}") from e
        loaded.setdefault(target, set()).add(shard)
    missing = {name: sorted(set(getattr(param, "shard_ids", (None,))) - loaded.get(name, set()), key=repr)
               for name, param in params.items()}
    missing = [name if parts == [None] else f"{name} {parts[:3]}" for name, parts in missing.items() if parts]
    if missing:  # a merged parameter names its parts not loaded: q/k/v, (expert, part)
        raise ValueError(f"the checkpoint lacks weights for {len(missing)} parameters, e.g. {missing[:5]}")
