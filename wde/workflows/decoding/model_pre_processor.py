"""Scheduler output -> one flat batch of tokens with the metadata attention and sampling need."""
from dataclasses import dataclass

import torch

from wde.core import interfaces
from wde.core.attention.metadata import PagedAttentionMetadata
from wde.core.sampler import SamplingMetadata
from wde.workflows.decoding.scheduler import SchedulerOutput


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn_metadata: PagedAttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled] int64: rows whose hidden state yields a next token
    sampling: SamplingMetadata

    def to(self, device: torch.device) -> "ModelInput":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return ModelInput(move(self.input_ids), move(self.positions), self.attn_metadata.to(device),
                          move(self.logits_indices), self.sampling.to(device))


def build_model_input(token_ids: list[int], positions: list[int], slots: list[int], query_lens: list[int],
                      seq_lens: list[int], block_tables: list[list[int]], logits_indices: list[int],
                      temperatures: list[float], num_logprobs: int | None) -> ModelInput:
    width = max(len(table) for table in block_tables)
    padded_tables = [table + [0] * (width - len(table)) for table in block_tables]
    query_start_loc = [0]
    for query_len in query_lens:
        query_start_loc.append(query_start_loc[-1] + query_len)
    attn_metadata = PagedAttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(padded_tables, dtype=torch.int32),
        query_lens_host=query_lens, seq_lens_host=seq_lens)
    sampling = SamplingMetadata(temperature=torch.tensor(temperatures, dtype=torch.float32),
                                all_greedy=all(t == 0 for t in temperatures),
                                all_random=all(t > 0 for t in temperatures), num_logprobs=num_logprobs)
    return ModelInput(torch.tensor(token_ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64),
                      attn_metadata, torch.tensor(logits_indices, dtype=torch.int64), sampling)


class DecodingModelPreProcessor(interfaces.ModelPreProcessor):
    def __init__(self, config):
        super().__init__(config)
        self.block_size = config.args.block_size

    def __call__(self, scheduler_output: SchedulerOutput) -> ModelInput:
        block_size = self.block_size
        token_ids, positions, slots, query_lens, seq_lens, block_tables = [], [], [], [], [], []
        logits_indices, temperatures, num_logprobs = [], [], None
        for scheduled in scheduler_output.scheduled:
            seq, start, count = scheduled.seq, scheduled.start, scheduled.num_tokens
            end = start + count
            token_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[pos // block_size] * block_size + pos % block_size for pos in range(start, end))
            query_lens.append(count)
            seq_lens.append(end)
            block_tables.append(table)
            if scheduled.samples:
                logits_indices.append(len(token_ids) - 1)
                temperatures.append(seq.params.temperature)
                if seq.params.logprobs is not None:
                    num_logprobs = max(num_logprobs or 0, seq.params.logprobs)
        return build_model_input(token_ids, positions, slots, query_lens, seq_lens, block_tables, logits_indices,
                                 temperatures, num_logprobs)
