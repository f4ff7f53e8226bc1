"""Scheduler output -> one flat batch of tokens with the metadata attention and sampling need."""
from dataclasses import dataclass, field, replace

import torch

from wde.core import interfaces
from wde.core.attention.metadata import PagedAttentionMetadata, build_attn_metadata, slots_of
from wde.core.kv_cache.host_tier import BlockCopies
from wde.core.sampling.sampler import Penalties, SamplingMetadata
from wde.workflows.decoding.scheduler import ScheduledSequence, SchedulerOutput
from wde.workflows.decoding.sequence import Sequence
from wde.workflows.decoding.stop_checker import eos_token_ids


@dataclass
class PromptLogprobRows:
    """Rows of the flat batch whose logits give log-probabilities of the prompt tokens that follow them."""

    scheduled_index: int  # which entry of the SchedulerOutput these rows belong to
    first_row: int
    targets: list[int]  # the prompt tokens those rows predict
    k: int  # top-k alternatives wanted


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn_metadata: PagedAttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled] int64: rows whose hidden state yields a next token
    sampling: SamplingMetadata | None
    prompt_logprobs: list[PromptLogprobRows] = field(default_factory=list)
    # async scheduling: per row, which of the last step's samples is its input token (-1: input_ids has it)
    in_flight_rows: torch.Tensor | None = None
    # every row takes the argmax and nothing else reads the logits: each rank reduces its vocabulary slice
    greedy: bool = False
    block_copies: BlockCopies = field(default_factory=BlockCopies)  # between the KV cache's tiers, run first

    def for_workers(self) -> "ModelInput":
        """Everything but the sampling settings: rank 0 samples."""
        return replace(self, sampling=None)


def padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(map(len, rows), default=0)
    return torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.int64).view(len(rows), width)


def build_sampling_metadata(seqs: list[Sequence], vocab_size: int, eos_ids: frozenset[int],
                            structured_outputs: interfaces.StructuredOutputBackend | None = None
                            ) -> SamplingMetadata:
    """Per-row sampling settings of the sequences that sample this step; optional parts only when used."""
    params = [seq.params for seq in seqs]
    temperatures = [p.temperature for p in params]
    meta = SamplingMetadata(temperature=torch.tensor(temperatures, dtype=torch.float32),
                            all_greedy=not any(temperatures), all_random=all(temperatures),
                            num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=None))
    special = [p for p in params if p.truncates or p.uses_penalties or p.min_tokens or p.seed is not None
               or p.structured_outputs is not None]
    if not special:  # nothing below applies to any row (the usual case): skip the per-row scans
        return meta
    if any(p.top_k > 0 for p in params):
        meta.top_k = torch.tensor([min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params])
    if any(p.top_p < 1 for p in params):
        meta.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
    if any(p.min_p > 0 for p in params):
        meta.min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)
    if any(p.uses_penalties for p in params):
        repetition = any(p.repetition_penalty != 1 for p in params)
        meta.penalties = Penalties(
            presence=torch.tensor([p.presence_penalty for p in params], dtype=torch.float32),
            frequency=torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32),
            repetition=torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32),
            output_tokens=padded([seq.output_token_ids for seq in seqs], pad=vocab_size),
            prompt_tokens=padded([seq.token_ids[:seq.num_prompt_tokens] for seq in seqs], pad=vocab_size)
            if repetition else None)
    banned = [(row, token) for row, seq in enumerate(seqs) if seq.num_output_tokens < seq.params.min_tokens
              for token in (set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else eos_ids))]
    if banned:
        meta.banned = (torch.tensor([r for r, _ in banned]), torch.tensor([t for _, t in banned]))
    meta.generators = {row: seq.generator for row, seq in enumerate(seqs)
                       if seq.generator is not None and seq.params.temperature > 0}
    constrained = [row for row, seq in enumerate(seqs) if seq.grammar is not None]
    if constrained:
        meta.allowed = structured_outputs.token_mask(constrained, [seqs[row].grammar for row in constrained])
        meta.allowed_rows = torch.tensor(constrained, dtype=torch.int64)
    return meta


def in_flight_source(rows: list[tuple[int, int]], num_tokens: int) -> torch.Tensor | None:
    """[num_tokens] int64: for each row, the index of its input token among the last step's samples, or -1."""
    if not rows:
        return None
    source = torch.full((num_tokens,), -1, dtype=torch.int64)
    flat_rows, sample_rows = zip(*rows)
    source[list(flat_rows)] = torch.tensor(sample_rows, dtype=torch.int64)
    return source


def prompt_logprob_rows(index: int, scheduled: ScheduledSequence, first_flat_row: int) -> PromptLogprobRows | None:
    """The rows of this chunk that predict prompt tokens whose log-probabilities are not known yet."""
    seq, start = scheduled.seq, scheduled.start
    first = max(start, len(seq.prompt_logprobs) - 1)  # row r predicts token r + 1
    end = min(start + scheduled.num_tokens, seq.num_prompt_tokens - 1)
    if first >= end:
        return None
    return PromptLogprobRows(index, first_flat_row + first - start, seq.token_ids[first + 1:end + 1],
                             seq.params.prompt_logprobs)


def add_group_slots(tables: list[list[int]], start: int, end: int, block_size: int, group_slots: list[list[int]],
                    group_tables: list[list[list[int]]]) -> None:
    """A sequence's positions start..end-1 in the KV layer groups after the first: their slots and its tables."""
    for table, slots, step_tables in zip(tables, group_slots, group_tables):
        slots.extend(slots_of(table, start, end, block_size))
        step_tables.append(table)


class DecodingModelPreProcessor(interfaces.ModelPreProcessor[SchedulerOutput, ModelInput]):
    @classmethod
    def from_engine(cls, engine) -> "DecodingModelPreProcessor":
        return cls(engine.config, eos_token_ids(engine.tokenizer, engine.config.model.hf_config),
                   engine.structured_outputs)

    def __init__(self, config, eos_ids: frozenset[int],
                 structured_outputs: interfaces.StructuredOutputBackend | None = None):
        super().__init__(config)
        self.structured_outputs = structured_outputs
        self.block_size = config.args.block_size
        self.vocab_size = config.model.vocab_size
        self.eos_ids = eos_ids

    def __call__(self, scheduler_output: SchedulerOutput) -> ModelInput:
        block_size = self.block_size
        token_ids, positions, slots, query_lens, seq_lens, block_tables = [], [], [], [], [], []
        logits_indices, sampled, prompt_logprobs, in_flight_rows = [], [], [], []
        num_more_groups = len(scheduler_output.scheduled[0].seq.group_tables)  # KV layer groups after the first
        group_slots, group_tables = [[] for _ in range(num_more_groups)], [[] for _ in range(num_more_groups)]
        for index, scheduled in enumerate(scheduler_output.scheduled):
            seq, start, count = scheduled.seq, scheduled.start, scheduled.num_tokens
            end = start + count
            table = seq.block_table
            if num_more_groups:
                add_group_slots(seq.group_tables, start, end, block_size, group_slots, group_tables)
            if count == 1:  # the common case, a decode step: no ranges to build
                if start < len(seq.token_ids):
                    token_ids.append(seq.token_ids[start])
                else:  # still being sampled by the last step (async scheduling): the worker takes it there
                    in_flight_rows.append((len(token_ids), seq.sample_row))
                    token_ids.append(0)
                positions.append(start)
                slots.append(table[start // block_size] * block_size + start % block_size)
            else:
                if seq.prompt_logprobs is not None:
                    rows = prompt_logprob_rows(index, scheduled, len(token_ids))
                    if rows is not None:
                        prompt_logprobs.append(rows)
                token_ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                slots.extend(slots_of(table, start, end, block_size))
            query_lens.append(count)
            seq_lens.append(end)
            block_tables.append(table)
            if scheduled.samples:
                logits_indices.append(len(token_ids) - 1)
                sampled.append(seq)
        sampling = build_sampling_metadata(sampled, self.vocab_size, self.eos_ids, self.structured_outputs)
        # only once the whole step is built: a build that fails leaves every sequence as it was
        for row, seq in enumerate(sampled):
            seq.sample_row = row
        return ModelInput(torch.tensor(token_ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64),
                          build_attn_metadata(slots, query_lens, seq_lens, block_tables, group_slots, group_tables),
                          torch.tensor(logits_indices, dtype=torch.int64), sampling, prompt_logprobs,
                          in_flight_source(in_flight_rows, len(token_ids)), sampling.only_argmax,
                          scheduler_output.block_copies)

    def needs_known_tokens(self, scheduler_output: SchedulerOutput) -> bool:
        """Whether some row's sampling settings read its sequence's output so far (penalties, min_tokens) while
        its last token is still in flight: async scheduling then lets that token arrive before building the
        step. (A structured output's mask needs it too, but is filled only when the step's sampling proceeds,
        after the tokens of the step before reached the matchers.)"""
        return any(s.seq.num_pending_tokens and (s.seq.params.uses_penalties or s.seq.params.min_tokens)
                   for s in scheduler_output.scheduled)
