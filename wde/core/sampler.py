"""Picks the next token of every sequence in a step at once, on the device."""
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [num_seqs] float32; 0 means greedy
    all_greedy: bool
    all_random: bool
    num_logprobs: int | None  # most top-k logprobs any sequence asked for; None: nobody asked

    def to(self, device: torch.device) -> "SamplingMetadata":
        return SamplingMetadata(self.temperature.to(device, non_blocking=True), self.all_greedy, self.all_random,
                                self.num_logprobs)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # present when some sequence asked for logprobs (of the model's own distribution, before temperature)
    token_logprobs: list[float] | None = None
    token_ranks: list[int] | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


class Sampler(nn.Module):
    def __init__(self, device: torch.device, seed: int):
        super().__init__()
        self.generator = torch.Generator(device).manual_seed(seed)

    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()
        token_ids = self._sample(logits, meta)
        if meta.num_logprobs is None:
            return SamplerOutput(token_ids.tolist())
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, token_ids[:, None])
        ranks = (logprobs > chosen).sum(dim=-1) + 1
        top = logprobs.topk(meta.num_logprobs, dim=-1)
        return SamplerOutput(token_ids.tolist(), chosen[:, 0].tolist(), ranks.tolist(), top.indices.tolist(),
                             top.values.tolist())

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        if meta.all_greedy:
            return logits.argmax(dim=-1)
        temperature = torch.where(meta.temperature > 0, meta.temperature, 1.0)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        # argmax(p / q) with q ~ Exp(1) draws from p (the exponential-race form of the Gumbel trick): one
        # kernel pass for the whole batch, no cumulative sums, no host sync
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        sampled = (probs / noise).argmax(dim=-1)
        if meta.all_random:
            return sampled
        return torch.where(meta.temperature > 0, sampled, logits.argmax(dim=-1))
