"""The decoding Worker: a forward pass over the flat batch, then the next token of each finished row."""
from dataclasses import replace

import torch

from wde.core.attention.metadata import dummy_paged_batch
from wde.core.cuda_graphs import StepCudaGraphs
from wde.core.forward_context import set_forward_context
from wde.core.interfaces import LaunchedStep
from wde.core.layers.embedding import gather_vocab, greedy_tokens
from wde.core.parallel.distributed import broadcast_from_first_rank, get_tp_rank, get_tp_size
from wde.core.sampling.sampler import (HeldSampling, LogprobTensors, PendingSamplerOutput, Sampler, SamplerOutput,
                                       SamplingMetadata, token_logprobs)
from wde.core.worker import ModelWorker
from wde.workflows.decoding.model_pre_processor import ModelInput


class DecodingWorker(ModelWorker):
    splits_kv_by_window = True  # long generations free their windowed layers' old blocks as they go

    def __init__(self, config, components):
        super().__init__(config, components)
        self.sampler = Sampler(self.device, config.args.seed)
        self.vocab_size = config.model.vocab_size
        self.last_sampled: torch.Tensor | None = None  # the last step's samples (async scheduling)
        self.held: HeldSampling | None = None  # the last step's sampling, until it is queued
        self.cuda_graphs: StepCudaGraphs | None = None

    def init_kv_cache(self, num_blocks: int) -> None:
        super().init_kv_cache(num_blocks)
        args = self.config.args
        if self.device.type == "cuda" and not args.enforce_eager and self.attn_backend.supports_cuda_graphs:
            self.cuda_graphs = StepCudaGraphs(self.model, args.max_num_seqs, args.max_num_batched_tokens,
                                              self.config.model.max_model_len, args.block_size, self.device,
                                              self._greedy_tokens if get_tp_size() == 1 else None,
                                              with_prefill=self.attn_backend.supports_prefill_cuda_graphs,
                                              num_kv_groups=self.kv_layer_groups.num_groups)

    def _greedy_tokens(self, shard_logits: torch.Tensor) -> torch.Tensor:
        return greedy_tokens(shard_logits, self.vocab_size)

    def execute_model(self, model_input: ModelInput) -> SamplerOutput | None:
        """The step's sampled tokens on rank 0; None on the other tensor-parallel ranks, which take part in the
        forward pass and in choosing the tokens (the logits' gather, or the greedy vote) but report nothing."""
        pending = self.launch(model_input)
        return pending.result() if pending is not None else None

    @torch.inference_mode()
    def launch(self, model_input: ModelInput) -> LaunchedStep[SamplerOutput] | None:
        """Queue the step on the device and return without waiting for it (on rank 0: its samples to come)."""
        if self.held is not None:  # this step's input tokens may be those samples: they are queued first
            self.held.queue()
            self.held = None
        self.run_block_copies(model_input.block_copies)
        model_input = self.copier.to_device(model_input)
        meta = model_input.attn_metadata
        if model_input.in_flight_rows is not None:
            model_input = self._take_in_flight_tokens(model_input)
        graphs = self.cuda_graphs
        if graphs is not None and graphs.can_run_decode(meta):
            # a decode step: every row samples, and no prompt is being read (so no prompt logprobs)
            shard_logits, greedy = graphs.run_decode(model_input.input_ids, model_input.positions, meta)
            return self._sample(shard_logits, model_input, [], greedy)
        if graphs is not None and graphs.can_run_with_prefill(len(model_input.input_ids), meta):
            hidden = graphs.run_with_prefill(model_input.input_ids, model_input.positions, meta)
        else:
            with set_forward_context(meta):
                hidden = self.model(model_input.input_ids, model_input.positions)
        shard_logits = self.model.compute_logits(hidden[model_input.logits_indices], gather=False)
        prompt_logprobs = []
        for rows in model_input.prompt_logprobs:
            prompt_logits = self.model.compute_logits(hidden[rows.first_row:rows.first_row + len(rows.targets)])
            if get_tp_rank() == 0:
                targets = torch.tensor(rows.targets, device=self.device)
                prompt_logprobs.append((rows.scheduled_index, token_logprobs(prompt_logits, targets, rows.k)))
        return self._sample(shard_logits, model_input, prompt_logprobs)

    def _sample(self, shard_logits: torch.Tensor, model_input: ModelInput,
                prompt_logprobs: list[tuple[int, LogprobTensors]], greedy: torch.Tensor | None = None
                ) -> LaunchedStep[SamplerOutput] | None:
        """A greedy step's tokens come from the ranks' vocabulary slices, on every rank; otherwise rank 0 gathers
        the logits and samples. With async scheduling every rank also keeps the samples on its device, where
        the next step (launched before these reach the host) takes its input tokens: after rank 0 sampled, it
        broadcasts them. With async scheduling, a step with constrained rows also holds its sampling until the
        stepper proceeds: their masks come from matchers that take the last step's tokens only once those reach
        the host."""
        if model_input.greedy:  # the CUDA graph took them already, or the argmax runs now
            token_ids = greedy if greedy is not None else self._greedy_tokens(shard_logits)
            return self._keep(token_ids, None, prompt_logprobs, None)
        logits = gather_vocab(shard_logits, self.vocab_size)
        if get_tp_rank() != 0:
            return self._keep(self._broadcast(torch.empty(len(logits), dtype=torch.int64, device=self.device)),
                              None, prompt_logprobs, None)
        sampling = model_input.sampling

        def sample() -> PendingSamplerOutput:
            try:
                token_ids, logprobs, runners_up = self.sampler(logits, sampling)
            except Exception:
                # the step fails; the next one, launched already, reads its in-flight tokens from these samples
                # (for rows of the requests that fail with it) and the other ranks wait for them: zeros, in range
                self._keep(self._broadcast(torch.zeros(len(logits), dtype=torch.int64, device=self.device)),
                           None, [], None)
                raise
            return self._keep(self._broadcast(token_ids), logprobs, prompt_logprobs, runners_up)
        if sampling.allowed is None or not self.config.args.async_scheduling:  # nothing to overlap the masks with
            return sample()
        # over several ranks the others wait in the broadcast of these samples, which must come before the
        # next step's input reaches them: sampled as soon as the stepper proceeds
        self.held = HeldSampling(lambda: sampling.allowed.prepare(logits), sample,
                                 queue_on_proceed=get_tp_size() > 1)
        return self.held

    def _broadcast(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.config.args.async_scheduling:
            broadcast_from_first_rank(token_ids)
        return token_ids

    def _keep(self, token_ids: torch.Tensor, logprobs: LogprobTensors | None,
              prompt_logprobs: list[tuple[int, LogprobTensors]], runners_up) -> PendingSamplerOutput | None:
        """With async scheduling the next step takes its input tokens from these samples, on the device; rank 0
        sends them to the host."""
        if self.config.args.async_scheduling:
            self.last_sampled = token_ids
        return PendingSamplerOutput(token_ids, logprobs, prompt_logprobs, runners_up) if get_tp_rank() == 0 else None

    def _take_in_flight_tokens(self, model_input: ModelInput) -> ModelInput:
        """Rows whose input token the last step sampled take it from that step's samples, on the device."""
        source, known = model_input.in_flight_rows, model_input.input_ids
        input_ids = torch.where(source >= 0, self.last_sampled[source.clamp(min=0)], known)
        return replace(model_input, input_ids=input_ids, in_flight_rows=None)

    def profile_run(self) -> None:
        """The largest step: max_num_batched_tokens tokens over max_num_seqs sequences, each sampling."""
        args = self.config.args
        num_tokens = min(args.max_num_batched_tokens, args.max_num_seqs * self.config.model.max_model_len)
        num_seqs = min(args.max_num_seqs, num_tokens)
        positions, metadata, last_rows, num_blocks = dummy_paged_batch(num_tokens, num_seqs, args.block_size,
                                                                       self.kv_layer_groups.num_groups)
        self.allocate_kv_cache(num_blocks)  # a scratch cache the dummy sequences share; dropped below
        sampling = SamplingMetadata(temperature=torch.ones(num_seqs), all_greedy=False, all_random=True,
                                    num_logprobs=None)
        self.execute_model(ModelInput(torch.zeros(num_tokens, dtype=torch.int64),
                                      torch.tensor(positions, dtype=torch.int64), metadata,
                                      torch.tensor(last_rows, dtype=torch.int64), sampling))
        self.release_kv_cache()
