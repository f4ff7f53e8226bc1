"""The prefill-only Worker: one forward pass over a flat batch of whole inputs, then the Pooler; the results
come to the host in one copy queued behind the step, so the host can build the next step meanwhile."""
import math

import torch

from wde.core.attention.metadata import dummy_paged_batch
from wde.core.interfaces import LaunchedStep
from wde.core.forward_context import set_forward_context
from wde.core.pinned_copy import copy_to_host
from wde.core.pooling_params import PoolingParams
from wde.core.worker import ModelWorker
from wde.workflows.prefill_only.model_pre_processor import PoolingMetadata, PrefillOnlyModelInput


class PrefillOnlyWorker(ModelWorker):
    def __init__(self, config, components):
        super().__init__(config, components)
        pooler = components["Pooler"]
        try:
            self.pooler = pooler.from_worker(config, self.model, components)
        except TypeError as e:
            raise TypeError(f"slot 'Pooler' ({pooler.__module__}.{pooler.__qualname__}) could not be built: {e} "
                            "(a Pooler takes (config, model), or overrides from_worker)") from e

    def execute_model(self, model_input: PrefillOnlyModelInput) -> list[torch.Tensor]:
        return self.launch(model_input).result()

    @torch.inference_mode()
    def launch(self, model_input: PrefillOnlyModelInput) -> "PendingPooledOutput":
        self.run_block_copies(model_input.block_copies)
        model_input = self.copier.to_device(model_input)
        extra = () if model_input.token_type_ids is None else (model_input.token_type_ids,)
        with set_forward_context(model_input.attn_metadata):
            hidden = self.model(model_input.input_ids, model_input.positions, *extra)
        return PendingPooledOutput(self.pooler(hidden, model_input.pooling))

    def profile_run(self) -> None:
        """The largest step of a decoder: max_num_batched_tokens tokens over max_num_seqs inputs."""
        args = self.config.args
        num_seqs = min(args.max_num_seqs, args.max_num_batched_tokens)
        positions, metadata, last_rows, num_blocks = dummy_paged_batch(args.max_num_batched_tokens, num_seqs,
                                                                       args.block_size)
        self.allocate_kv_cache(num_blocks)  # a scratch cache the dummy inputs share; dropped below
        lengths = torch.tensor(metadata.query_lens_host)
        pooling = PoolingMetadata(torch.cumsum(lengths, 0) - lengths, lengths, [PoolingParams()] * num_seqs)
        self.execute_model(PrefillOnlyModelInput(torch.zeros(len(positions), dtype=torch.int64),
                                                 torch.tensor(positions, dtype=torch.int64), None, metadata, pooling))
        self.release_kv_cache()


class PendingPooledOutput(LaunchedStep[list[torch.Tensor]]):
    """A step's pooled results on their way to the host. A Pooler gives one tensor whose rows are the inputs'
    results (one copy), or one tensor per input (flattened into one buffer on the device, then one copy)."""

    def __init__(self, results: torch.Tensor | list[torch.Tensor]):
        self.rows = isinstance(results, torch.Tensor)
        self.shapes = None if self.rows else [(r.shape, r.dtype) for r in results]
        if not self.rows:
            results = torch.cat([r.reshape(-1) for r in results]) if results else torch.empty(0)
        self.host = copy_to_host(results)
        self.copied = None
        if results.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()

    def result(self) -> list[torch.Tensor]:
        host = self.host
        if self.copied is not None:
            self.copied.synchronize()
            host = host.clone()  # the results the caller keeps must not hold pinned memory
        if self.rows:
            return list(host)
        sizes = [math.prod(shape) for shape, _ in self.shapes]
        return [part.view(shape).to(dtype) for part, (shape, dtype) in zip(host.split(sizes), self.shapes)]
