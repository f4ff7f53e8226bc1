"""Picks the next token of every sequence in a step at once, on the device.

Per row: penalties (repetition, then frequency and presence), tokens banned for now (min_tokens) and those a
structured output forbids, then greedy rows take the argmax; the others are divided by their temperature, cut
by min_p, top_k and top_p, and sampled. Rows whose request has a seed draw their noise from the request's own
generator, so its tokens do not depend on the rest of the batch. A constrained row also gets its runners-up:
the tokens its sampling would have taken next, for when its matcher refuses a token its mask let through.
"""
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import nn

from wde.core.interfaces import LaunchedStep, TokenMask
from wde.core.pinned_copy import copy_to_host


@dataclass
class Penalties:
    presence: torch.Tensor  # [rows] float32
    frequency: torch.Tensor  # [rows] float32
    repetition: torch.Tensor  # [rows] float32, 1 = off
    output_tokens: torch.Tensor  # [rows, longest output] int64, padded with vocab_size
    prompt_tokens: torch.Tensor | None  # [rows, longest prompt] int64, padded with vocab_size; None: no repetition


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [rows] float32; 0 means greedy
    all_greedy: bool
    all_random: bool
    num_logprobs: int | None  # most top-k logprobs any row asked for; None: no row asked
    top_k: torch.Tensor | None = None  # [rows] int64, vocab_size where off; None: off for all rows
    top_p: torch.Tensor | None = None  # [rows] float32
    min_p: torch.Tensor | None = None  # [rows] float32
    penalties: Penalties | None = None
    banned: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids) that may not be sampled yet
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> its request's generator
    allowed: TokenMask | None = None  # structured outputs: what the constrained rows may sample
    allowed_rows: torch.Tensor | None = None  # [constrained rows] int64: allowed.rows, moved with the rest

    @property
    def only_argmax(self) -> bool:
        """Every row's token is the argmax of its raw logits, and no log-probabilities are wanted."""
        return (self.all_greedy and self.num_logprobs is None and self.penalties is None and self.banned is None
                and self.allowed is None)


@dataclass
class TokenLogprobs:
    """Log-probabilities of chosen tokens, their ranks, and the top-k alternatives, one entry per row."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


LogprobTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# xgrammar's mask lets through a few tokens its matcher then refuses (a number's "-" followed by the first byte
# of a UTF-8 character: 1 token in 11,000 after "[" of an integer array, over a byte-level vocabulary): each
# constrained row carries this many runners-up, of which the first the matcher accepts replaces the refused one
RUNNERS_UP = 8


def logprobs_of(logprobs: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities, ranks among their row, from 1) of `token_ids` [rows, n] in `logprobs` [rows, vocab];
    one column at a time, so that nothing [rows, n, vocab] is made."""
    chosen = logprobs.gather(1, token_ids)
    ranks = torch.stack([(logprobs > chosen[:, i, None]).sum(dim=-1) + 1 for i in range(token_ids.shape[1])], 1)
    return chosen, ranks


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobTensors:
    """The model's own log-probabilities (before any sampling rule) of `token_ids`, rows of `logits`, as the
    tensors of a TokenLogprobs (still on the device)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen, ranks = logprobs_of(logprobs, token_ids[:, None])
    top = logprobs.topk(k, dim=-1)
    return token_ids, chosen[:, 0], ranks[:, 0], top.indices, top.values


@dataclass
class RunnersUp:
    """Per constrained row, the tokens its sampling would take were the sampled one refused, best first (the
    next greedy picks, or the next in the exponential race: a sample from what is left either way). Tensors on
    the device, then on the host; read only for a row whose token was refused."""

    rows: list[int]  # the rows of the step they belong to
    token_ids: torch.Tensor  # [len(rows), RUNNERS_UP] int64
    valid: torch.Tensor  # [len(rows), RUNNERS_UP] bool: the row could sample it at all
    logprobs: torch.Tensor | None = None  # the model's own, as TokenLogprobs, when the step asked for them
    ranks: torch.Tensor | None = None

    def to_host(self) -> "RunnersUp":
        return RunnersUp(self.rows, *(None if t is None else copy_to_host(t)
                                      for t in (self.token_ids, self.valid, self.logprobs, self.ranks)))


def runners_up(logits: torch.Tensor, race: torch.Tensor | None, raw_logits: torch.Tensor, meta: "SamplingMetadata"
               ) -> RunnersUp:
    """The constrained rows' RUNNERS_UP best tokens by what their sampling maximized: `logits` (greedy rows,
    masked) or `race` (sampled rows), with which of them the row could take at all (-inf and 0 it could not)."""
    rows, index = meta.allowed.rows, meta.allowed_rows  # (a tensor made here would be a copy that waits)
    k = min(RUNNERS_UP, logits.shape[-1])
    greedy = logits[index].topk(k, dim=-1)
    token_ids, valid = greedy.indices, greedy.values > float("-inf")
    if race is not None:
        raced, sampled = race[index].topk(k, dim=-1), (meta.temperature[index] > 0)[:, None]
        token_ids, valid = torch.where(sampled, raced.indices, token_ids), torch.where(sampled, raced.values > 0, valid)
    found = RunnersUp(rows, token_ids, valid)
    if meta.num_logprobs is not None:
        found.logprobs, found.ranks = logprobs_of(torch.log_softmax(raw_logits[index], dim=-1), token_ids)
    return found


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: TokenLogprobs | None = None  # when some row asked for logprobs
    prompt_logprobs: list[tuple[int, TokenLogprobs]] = field(default_factory=list)  # (scheduled index, rows)
    runners_up: RunnersUp | None = None  # when some row is constrained
    replaced_rows: list[int] = field(default_factory=list)  # rows whose token gave way to a runner-up

    def take_runner_up(self, row: int, accepts) -> bool:
        """Replace `row`'s token (and its log-probability) by the first of its runners-up that `accepts` (a
        matcher's accept_token, which advances on the token it accepts); False when none does."""
        runners_up, refused = self.runners_up, self.token_ids[row]
        if runners_up is None or row not in runners_up.rows:
            return False
        i = runners_up.rows.index(row)
        for j in runners_up.valid[i].nonzero()[:, 0].tolist():
            token = int(runners_up.token_ids[i, j])
            if token != refused and accepts(token):
                self.token_ids[row] = token
                self.replaced_rows.append(row)
                if self.logprobs is not None:
                    self.logprobs.token_ids[row] = token
                    self.logprobs.logprobs[row] = float(runners_up.logprobs[i, j])
                    self.logprobs.ranks[row] = int(runners_up.ranks[i, j])
                return True
        return False


class PendingSamplerOutput(LaunchedStep[SamplerOutput]):
    """A step's samples on their way to the host. The copies are queued right behind the step, so result()
    never waits for a step launched after this one (async scheduling launches the next step first)."""

    def __init__(self, token_ids: torch.Tensor, logprobs: LogprobTensors | None,
                 prompt_logprobs: list[tuple[int, LogprobTensors]],
                 runners_up: RunnersUp | None = None):
        self.token_ids = copy_to_host(token_ids)
        self.logprobs = None if logprobs is None else tuple(map(copy_to_host, logprobs))
        self.prompt_logprobs = [(index, tuple(map(copy_to_host, parts))) for index, parts in prompt_logprobs]
        self.runners_up = None if runners_up is None else runners_up.to_host()
        self.copied = None
        if token_ids.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()

    def result(self) -> SamplerOutput:
        if self.copied is not None:
            self.copied.synchronize()
        as_lists = lambda parts: TokenLogprobs(*(part.tolist() for part in parts))  # noqa: E731
        return SamplerOutput(self.token_ids.tolist(), None if self.logprobs is None else as_lists(self.logprobs),
                             [(index, as_lists(parts)) for index, parts in self.prompt_logprobs],
                             self.runners_up)


class HeldSampling(LaunchedStep[SamplerOutput]):
    """A step whose logits are queued and whose sampling is held: the masks of its constrained rows come from
    their matchers, which (async scheduling) take the tokens of the step before only once those reach the host,
    while this step's forward pass runs. proceed() starts filling the masks, in the background; queue() (the
    worker's next launch, or result()) queues the sampling behind them, so the host builds the next step
    meanwhile."""

    def __init__(self, prepare: Callable[[], None], sample: Callable[[], PendingSamplerOutput],
                 queue_on_proceed: bool = False):
        self._prepare, self._sample = prepare, sample
        self.queue_on_proceed = queue_on_proceed  # the sampling is queued by proceed() already
        self._proceeded = False
        self._pending: PendingSamplerOutput | None = None
        self._error: Exception | None = None  # raised by result(): the next step's launch must not fail of it

    def proceed(self) -> None:
        if not self._proceeded:
            self._proceeded = True
            self._prepare()
            if self.queue_on_proceed:
                self.queue()

    def queue(self) -> None:
        if self._pending is None and self._error is None:
            try:
                self.proceed()
                self._pending = self._sample()
            except Exception as e:  # noqa: BLE001 - this step's error, for its own requests
                self._error = e

    def result(self) -> SamplerOutput:
        self.queue()
        if self._error is not None:
            raise self._error
        return self._pending.result()


def apply_penalties(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    rows, vocab = logits.shape
    # one extra column swallows the padding id (vocab_size), then is dropped
    counts = torch.zeros(rows, vocab + 1, device=logits.device)
    counts.scatter_add_(1, penalties.output_tokens, torch.ones_like(penalties.output_tokens, dtype=counts.dtype))
    counts = counts[:, :vocab]
    if penalties.prompt_tokens is not None:
        seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, penalties.prompt_tokens, True)
        seen = seen[:, :vocab] | (counts > 0)
        repetition = penalties.repetition[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    return logits - penalties.frequency[:, None] * counts - penalties.presence[:, None] * (counts > 0)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
                      ) -> torch.Tensor:
    ascending, order = logits.sort(dim=-1)
    vocab = logits.shape[-1]
    if top_k is not None:
        kth_largest = ascending.gather(1, (vocab - top_k.clamp(1, vocab))[:, None])
        ascending = ascending.masked_fill(ascending < kth_largest, float("-inf"))
    if top_p is not None:
        # drop the least likely tokens while the mass of those left stays at least top_p (keep at least one)
        cumulative = torch.softmax(ascending, dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p[:, None]
        drop[:, -1] = False
        ascending = ascending.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ascending)


class Sampler(nn.Module):
    def __init__(self, device: torch.device, seed: int):
        super().__init__()
        self.generator = torch.Generator(device).manual_seed(seed)

    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> "Samples":
        """The next token of every row, their log-probabilities when some row asked, and the constrained rows'
        runners-up, on the device."""
        logits = logits.float()
        raw_logits = logits
        if meta.penalties is not None:
            logits = apply_penalties(logits, meta.penalties)
        if meta.banned is not None:
            logits = logits.index_put(meta.banned, torch.tensor(float("-inf"), device=logits.device))
        if meta.allowed is not None:
            logits = logits.clone() if logits is raw_logits else logits  # logprobs are of the raw logits
            meta.allowed.apply(logits)
        race = None if meta.all_greedy else self._race(logits, meta)
        token_ids = logits.argmax(dim=-1) if race is None else race.argmax(dim=-1)
        if race is not None and not meta.all_random:
            token_ids = torch.where(meta.temperature > 0, token_ids, logits.argmax(dim=-1))
        logprobs = None
        if meta.num_logprobs is not None:
            logprobs = token_logprobs(raw_logits, token_ids, meta.num_logprobs)
        constrained = None if meta.allowed is None else runners_up(logits, race, raw_logits, meta)
        return Samples(token_ids, logprobs, constrained)

    def _race(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Per row, p / q for every token, whose argmax samples it: p its probability (after temperature,
        min_p, top_k and top_p), q ~ Exp(1) (the exponential race, a form of the Gumbel trick: one pass for the
        whole batch, no cumulative sums, no host sync; the next largest are a sample of what is left)."""
        logits = logits / torch.where(meta.temperature > 0, meta.temperature, 1.0)[:, None]
        if meta.min_p is not None:
            logits = apply_min_p(logits, meta.min_p)
        if meta.top_k is not None or meta.top_p is not None:
            logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, generator in meta.generators.items():
            noise[row].exponential_(generator=generator)
        return probs / noise


class Samples(NamedTuple):
    token_ids: torch.Tensor  # [rows] int64
    logprobs: LogprobTensors | None
    runners_up: RunnersUp | None  # of the constrained rows
