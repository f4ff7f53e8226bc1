"""The decoding Worker: a forward pass over the flat batch, then the next token of each finished row."""
import itertools

import torch

from wde.core.cuda_graphs import DecodeCudaGraphs
from wde.core.forward_context import set_forward_context
from wde.core.sampler import Sampler, SamplerOutput, SamplingMetadata, token_logprobs
from wde.core.worker import ModelWorker
from wde.workflows.decoding.model_pre_processor import ModelInput, build_attn_metadata


class DecodingWorker(ModelWorker):
    def __init__(self, config, components):
        super().__init__(config, components)
        self.sampler = Sampler(self.device, config.args.seed)
        self.cuda_graphs: DecodeCudaGraphs | None = None

    def init_kv_cache(self, num_blocks: int) -> None:
        super().init_kv_cache(num_blocks)
        args = self.config.args
        if self.device.type == "cuda" and not args.enforce_eager and self.attn_backend.supports_cuda_graphs:
            self.cuda_graphs = DecodeCudaGraphs(self.model, args.max_num_seqs, self.config.model.max_model_len,
                                                args.block_size, self.device)

    @torch.inference_mode()
    def execute_model(self, model_input: ModelInput) -> SamplerOutput:
        meta = model_input.attn_metadata
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(meta.num_seqs, meta.max_query_len):
            # a decode step: every row samples, and no prompt is being read (so no prompt logprobs)
            logits = self.cuda_graphs.run(model_input.input_ids, model_input.positions, meta)
            return self.sampler(logits, model_input.sampling.to(self.device))
        model_input = model_input.to(self.device)
        with set_forward_context(model_input.attn_metadata):
            hidden = self.model(model_input.input_ids, model_input.positions)
        output = self.sampler(self.model.compute_logits(hidden[model_input.logits_indices]), model_input.sampling)
        for rows in model_input.prompt_logprobs:
            prompt_logits = self.model.compute_logits(hidden[rows.first_row:rows.first_row + len(rows.targets)])
            targets = torch.tensor(rows.targets, device=self.device)
            output.prompt_logprobs.append((rows.scheduled_index, token_logprobs(prompt_logits, targets, rows.k)))
        return output

    def profile_run(self) -> None:
        """The largest step: max_num_batched_tokens tokens over max_num_seqs sequences, each sampling."""
        args = self.config.args
        num_tokens = min(args.max_num_batched_tokens, args.max_num_seqs * self.config.model.max_model_len)
        num_seqs = min(args.max_num_seqs, num_tokens)
        query_lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        longest = max(query_lens)
        num_blocks = -(-longest // args.block_size)
        self.allocate_kv_cache(num_blocks)  # a scratch cache all dummy sequences share; freed below
        positions = [p for n in query_lens for p in range(n)]
        ends = [end - 1 for end in itertools.accumulate(query_lens)]
        sampling = SamplingMetadata(temperature=torch.ones(num_seqs), all_greedy=False, all_random=True,
                                    num_logprobs=None)
        dummy = ModelInput(input_ids=torch.zeros(num_tokens, dtype=torch.int64),
                           positions=torch.tensor(positions, dtype=torch.int64),
                           attn_metadata=build_attn_metadata(positions, query_lens, query_lens,
                                                             [list(range(num_blocks))] * num_seqs),
                           logits_indices=torch.tensor(ends, dtype=torch.int64), sampling=sampling)
        self.execute_model(dummy)
        for layer in self.attn_layers:
            layer.kv_cache = None
