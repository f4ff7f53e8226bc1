"""The prefill-only Worker: one forward pass over a flat batch of whole inputs, then the Pooler."""
import torch

from wde.core.attention.metadata import dummy_paged_batch
from wde.core.forward_context import set_forward_context
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

    @torch.inference_mode()
    def execute_model(self, model_input: PrefillOnlyModelInput) -> list[torch.Tensor]:
        model_input = self.copier.to_device(model_input)
        extra = () if model_input.token_type_ids is None else (model_input.token_type_ids,)
        with set_forward_context(model_input.attn_metadata):
            hidden = self.model(model_input.input_ids, model_input.positions, *extra)
        return self.pooler(hidden, model_input.pooling)

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
