"""The part of a Worker every workflow shares: the model on its device, the attention backend, the KV cache."""
import logging
import time
from abc import abstractmethod

import torch

from wde.core import interfaces
from wde.core.attention.layer import Attention
from wde.core.attention.metadata import dummy_paged_batch
from wde.core.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from wde.core.forward_context import set_forward_context
from wde.core.kv_cache.host_pool import HostKVPool
from wde.core.kv_cache.host_tier import BlockCopies
from wde.core.kv_cache.kv_scales import (CALIBRATION_TOKENS, checkpoint_kv_scales, heads_of_this_rank, log_scales,
                                         scales_from_amax)
from wde.core.kv_cache.layer_groups import group_layers
from wde.core.loader.model_loader import load_model
from wde.core.parallel.distributed import init_device_all_reduce
from wde.core.pinned_copy import PinnedCopier, map_tensors

logger = logging.getLogger(__name__)


class ModelWorker(interfaces.Worker):
    splits_kv_by_window = False  # whether its layers' windows may split the KV cache into groups (layer_groups.py)

    def __init__(self, config: EngineConfig, components: dict[str, type]):
        super().__init__(config)
        self.device = config.device
        torch.manual_seed(config.args.seed)
        self.model = load_model(config.model, self.device, config.args.load_format, config.args.seed,
                                config.args.quantization)
        # the layers all-reduce [tokens, hidden] activations, at most max_num_batched_tokens rows of them
        init_device_all_reduce(config.args.max_num_batched_tokens * config.model.hidden_size, config.model.dtype,
                               self.device)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.kv_layers = [layer for layer in self.attn_layers if layer.uses_kv_cache]
        self.kv_layer_groups = group_layers([layer.sliding_window for layer in self.kv_layers],
                                            config.model.max_model_len, self.splits_kv_by_window)
        self.attn_backend = components["AttentionBackend"](config)  # chosen by the engine's selector
        if (self.attn_backend.kind == "paged") != bool(self.kv_layers):
            causal = self.attn_backend.kind == "paged"
            raise ValueError(f"{type(self.model).__name__} has {'' if self.kv_layers else 'no '}attention layers "
                             f"with a KV cache, but its workflow runs {self.attn_backend.kind} attention "
                             f"(Workflow.causal={causal}): it needs a workflow of the other kind")
        for layer in self.attn_layers:
            layer.backend = self.attn_backend
        self.kv_cache: torch.Tensor | None = None
        self.host_pool: HostKVPool | None = None  # the KV cache's host tier (kv_offload_gib), by init_kv_cache
        # a float8 cache's scales per layer, K/V and KV head (kv_cache/kv_scales.py), set by init_kv_cache; ones
        # until then (and for a cache of the model's dtype, whose kernels never read them)
        num_kv_heads = self.kv_layers[0].num_kv_heads if self.kv_layers else 0
        self.kv_scales = torch.ones(len(self.kv_layers), 2, num_kv_heads, device=self.device)
        for layer, scales in zip(self.kv_layers, self.kv_scales):
            layer.kv_scales = scales
        self.copier = PinnedCopier(self.device)  # each step's input, to the device in one copy

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.config.args.kv_cache_dtype == "fp8" else self.config.model.dtype

    def kv_block_bytes(self) -> int:
        layer, args = self.kv_layers[0], self.config.args
        elements = 2 * self.kv_layer_groups.layers_per_block * args.block_size * layer.num_kv_heads * layer.head_dim
        return elements * self.kv_cache_dtype.itemsize

    def num_host_kv_blocks(self) -> int:
        """The blocks of the host tier: num_kv_offload_blocks, else as many as kv_offload_gib holds."""
        args = self.config.args
        if not self.kv_layers:  # an encoder's (its scheduler refuses a tier)
            return 0
        if args.num_kv_offload_blocks is not None:
            return args.num_kv_offload_blocks
        num_blocks = int(args.kv_offload_gib * 2**30) // self.kv_block_bytes()
        if args.kv_offload_gib and not num_blocks:
            raise ValueError(f"kv_offload_gib={args.kv_offload_gib} holds no KV block (one takes "
                             f"{self.kv_block_bytes()} bytes)")
        return num_blocks

    def determine_num_kv_blocks(self) -> int:
        """The explicit num_kv_blocks, else as many blocks as the memory budget holds (and the engine can use)."""
        args, model = self.config.args, self.config.model
        if not self.kv_layers:  # an encoder keeps nothing between steps
            return 0
        if args.num_kv_blocks is not None:
            return args.num_kv_blocks
        if args.kv_cache_memory_bytes is not None:
            budget = args.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            budget = self.free_memory_after_profiling()
        else:
            budget = DEFAULT_CPU_KV_CACHE_BYTES
        num_blocks = budget // self.kv_block_bytes()
        if num_blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache (budget {budget / 2**20:.0f} MiB): lower "
                               "max_num_seqs / max_num_batched_tokens, or raise gpu_memory_utilization")
        most_usable = (args.max_num_seqs * -(-model.max_model_len // args.block_size)
                       * self.kv_layer_groups.num_groups)
        return min(num_blocks, most_usable)

    def free_memory_after_profiling(self) -> int:
        """GPU bytes left for the KV cache once the model and the activations of the largest step are in."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        self.profile_run()
        torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        not_torch = total - free - torch.cuda.memory_reserved(self.device)  # CUDA context, other processes
        budget = int(total * self.config.args.gpu_memory_utilization) - peak - not_torch
        logger.info("memory profile (the largest step, run in %.1f s): %.2f GiB total, %.2f GiB peak in torch, "
                    "%.2f GiB outside torch, %.2f GiB for the KV cache", seconds, total / 2**30, peak / 2**30,
                    not_torch / 2**30, budget / 2**30)
        torch.cuda.empty_cache()
        return budget

    @abstractmethod
    def profile_run(self) -> None:
        """Run one step as large as the scheduler can form, to measure its peak memory."""

    def init_kv_cache(self, num_blocks: int) -> None:
        if not num_blocks:
            return
        model, args = self.config.model, self.config.args
        if self.kv_cache_dtype == torch.float8_e4m3fn:
            self.kv_scales.copy_(self.float8_kv_scales())
        self.kv_cache = self.allocate_kv_cache(num_blocks)
        groups = self.kv_layer_groups
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB) on %s, in %d layer group(s) of %d layers "
                    "each (windows %s)", num_blocks, args.block_size, num_blocks * args.block_size,
                    self.kv_cache.numel() * self.kv_cache.dtype.itemsize / 2**30, self.device, groups.num_groups,
                    groups.layers_per_block, list(groups.windows))
        if num_host_blocks := self.num_host_kv_blocks():
            self.host_pool = HostKVPool(self.kv_cache, num_host_blocks)
            logger.info("KV cache host tier: %d blocks (%.2f GiB%s)", num_host_blocks, self.host_pool.num_bytes / 2**30,
                        ", pinned" if self.device.type == "cuda" else "")

    def run_block_copies(self, copies: BlockCopies) -> None:
        """The copies between the tiers a step needs before its forward pass (wde/core/kv_cache/host_pool.py)."""
        if copies:
            self.host_pool.run(copies)

    def host_copy_wait_s(self) -> float:
        return self.host_pool.wait_s() if self.host_pool is not None else 0.0

    def float8_kv_scales(self) -> torch.Tensor:
        """[KV layers, 2, this rank's KV heads]: the checkpoint's scales, else calibrated."""
        model = self.config.model
        scales = None if self.config.args.load_format == "dummy" else checkpoint_kv_scales(model)
        if scales is None:
            scales = self.calibrated_kv_scales()
            log_scales(scales, f"calibrated over {CALIBRATION_TOKENS} random tokens")
            return scales
        if scales.shape[0] != len(self.kv_layers):
            raise ValueError(f"the checkpoint has KV cache scales for {scales.shape[0]} layers, the model "
                             f"{len(self.kv_layers)} attention layers with a KV cache")
        scales = heads_of_this_rank(scales, model).to(self.device)
        log_scales(scales, "from the checkpoint")
        return scales

    @torch.inference_mode()
    def calibrated_kv_scales(self) -> torch.Tensor:
        """Scales from each head's amax of K and V over a prefill of random tokens (the same on every rank), its
        K and V stored in the model's dtype in a scratch cache, each layer's read as soon as it is written
        (layers of different groups share a slot of the cache)."""
        args, model = self.config.args, self.config.model
        num_tokens = min(CALIBRATION_TOKENS, args.max_num_batched_tokens, model.max_model_len)
        positions, metadata, _, num_blocks = dummy_paged_batch(num_tokens, 1, args.block_size,
                                                               self.kv_layer_groups.num_groups)
        generator = torch.Generator().manual_seed(self.config.args.seed)
        input_ids = torch.randint(model.vocab_size, (num_tokens,), generator=generator)
        amax = torch.zeros_like(self.kv_scales)

        def record(index: int):
            def hook(layer, inputs, output):
                written = layer.kv_cache.flatten(1, 2)[:, :num_tokens]  # [2, tokens, kv_heads, head_dim]
                amax[index] = written.abs().amax(dim=(1, 3)).float()
            return hook
        hooks = [layer.register_forward_hook(record(i)) for i, layer in enumerate(self.kv_layers)]
        self.allocate_kv_cache(num_blocks, model.dtype)
        try:
            with set_forward_context(map_tensors(metadata, lambda t: t.to(self.device))):
                self.model(input_ids.to(self.device), torch.tensor(positions, device=self.device))
        finally:
            for hook in hooks:
                hook.remove()
            self.release_kv_cache()
        return scales_from_amax(amax)

    def allocate_kv_cache(self, num_blocks: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor [layers a block holds, 2, blocks, block_size, kv_heads, head_dim] of `dtype` (default: the
        cache's); each attention layer gets its slot's slice, and reads it through its group's block tables.

        Zeroed: padding rows that a backend reads but masks out must hold finite numbers.
        """
        layer, args, groups = self.kv_layers[0], self.config.args, self.kv_layer_groups
        # this rank's KV heads (all of them without tensor parallelism)
        cache = torch.zeros(groups.layers_per_block, 2, num_blocks, args.block_size, layer.num_kv_heads,
                            layer.head_dim, dtype=dtype or self.kv_cache_dtype, device=self.device)
        for layer, group, slot in zip(self.kv_layers, groups.group_of_layer, groups.slot_of_layer):
            layer.kv_cache, layer.kv_group = cache[slot], group
        return cache

    def release_kv_cache(self) -> None:
        for layer in self.kv_layers:
            layer.kv_cache = None
