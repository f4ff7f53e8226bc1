"""The sampling rules on fixed logits: empirical frequencies over many draws against the exact distribution.

20,000 draws put one standard deviation of a frequency under 0.0036; the bound of 0.02 is over 5 of them,
while each wrong rule tried below (temperature applied the wrong way round, top-p boundary off by one token,
penalties with the wrong sign) moves some frequency by more than 0.05.
"""
import math

import pytest
import torch

from wde.core.sampling.sampler import (Penalties, PendingSamplerOutput, Sampler, SamplingMetadata,
                                       apply_penalties)

DRAWS = 20_000
TOLERANCE = 0.02
LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])


def draw(logits: torch.Tensor = LOGITS, seed: int = 0, **settings) -> torch.Tensor:
    """Frequencies of each token over DRAWS rows of the same logits, sampled in one batch."""
    rows = torch.ones(DRAWS, 1)
    meta = SamplingMetadata(temperature=rows[:, 0] * settings.pop("temperature", 1.0), all_greedy=False,
                            all_random=True, num_logprobs=None)
    for name in ("top_k", "top_p", "min_p"):
        if name in settings:
            setattr(meta, name, rows[:, 0].to(torch.int64 if name == "top_k" else torch.float32)
                    * settings.pop(name))
    if "penalties" in settings:
        meta.penalties = settings.pop("penalties")
    assert not settings
    tokens = Sampler(torch.device("cpu"), seed)(logits.expand(DRAWS, -1).clone(), meta).token_ids
    return torch.bincount(tokens, minlength=logits.shape[0]).float() / DRAWS


def close(freqs: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool((freqs - expected).abs().max() < TOLERANCE)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_divides_the_logits(temperature):
    freqs = draw(temperature=temperature)
    assert close(freqs, torch.softmax(LOGITS / temperature, -1))
    assert not close(freqs, torch.softmax(LOGITS * temperature, -1)) or temperature == 1.0


def test_temperature_zero_is_greedy_within_a_mixed_batch():
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    meta = SamplingMetadata(temperature=torch.tensor([0.0, 50.0, 0.0]), all_greedy=False, all_random=False,
                            num_logprobs=None)
    outs = [Sampler(torch.device("cpu"), seed)(logits, meta)[0].tolist() for seed in range(50)]
    assert all(out[0] == 1 and out[2] == 0 for out in outs)
    assert len({out[1] for out in outs}) == 3  # the hot row really samples


def test_top_k_keeps_the_k_most_likely():
    freqs = draw(top_k=2)
    assert freqs[2:].sum() == 0
    assert close(freqs, torch.softmax(torch.tensor([2.0, 1.0, -math.inf, -math.inf, -math.inf]), -1))


@pytest.mark.parametrize("top_p,kept", [(0.5, 1), (0.75, 2), (0.9, 3), (1.0, 5)])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([0.55, 0.25, 0.12, 0.05, 0.03])
    freqs = draw(probs.log(), top_p=top_p)
    expected = torch.zeros(5)
    expected[:kept] = probs[:kept] / probs[:kept].sum()
    assert freqs[kept:].sum() == 0 and close(freqs, expected)


def test_min_p_drops_tokens_below_a_share_of_the_top_one():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03])
    freqs = draw(probs.log(), min_p=0.2)  # threshold 0.1: the last two go
    expected = torch.tensor([0.5, 0.3, 0.12, 0.0, 0.0]) / 0.92
    assert freqs[3:].sum() == 0 and close(freqs, expected)


def test_temperature_applies_before_top_k_and_min_p():
    freqs = draw(temperature=2.0, top_k=3)
    expected = torch.softmax(torch.cat([LOGITS[:3] / 2.0, torch.full((2,), -math.inf)]), -1)
    assert close(freqs, expected)


def penalties(presence=0.0, frequency=0.0, repetition=1.0, output=(), prompt=None) -> Penalties:
    one = lambda v: torch.tensor([v], dtype=torch.float32).expand(DRAWS).clone()  # noqa: E731
    out = torch.tensor([list(output) or [5]]).expand(DRAWS, -1).clone()  # 5 = vocab size: padding
    prompt_tokens = None if prompt is None else torch.tensor([list(prompt)]).expand(DRAWS, -1).clone()
    return Penalties(one(presence), one(frequency), one(repetition), out, prompt_tokens)


def test_frequency_and_presence_penalties():
    # token 0 was generated twice, token 1 once
    freqs = draw(penalties=penalties(presence=0.5, frequency=0.4, output=[0, 1, 0]))
    expected_logits = LOGITS - torch.tensor([0.4 * 2 + 0.5, 0.4 + 0.5, 0, 0, 0])
    assert close(freqs, torch.softmax(expected_logits, -1))
    assert not close(freqs, torch.softmax(LOGITS + torch.tensor([1.3, 0.9, 0, 0, 0]), -1))


def test_repetition_penalty_shrinks_seen_tokens_towards_unlikely():
    # prompt holds token 2 (positive logit: divided) and token 3 (negative logit: multiplied); output token 0
    freqs = draw(penalties=penalties(repetition=2.0, output=[0], prompt=[2, 3]))
    expected_logits = torch.tensor([2.0 / 2, 1.0, 0.5 / 2, -1.0 * 2, -3.0])
    assert close(freqs, torch.softmax(expected_logits, -1))


def test_penalties_exact_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    p = Penalties(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([1.5]), torch.tensor([[1, 1, 4]]),
                  torch.tensor([[2, 4]]))
    expected = torch.tensor([[2.0, -1.5 - 1.0 - 1.0, 0.5 / 1.5, 0.0]])
    assert torch.allclose(apply_penalties(logits, p), expected)


def test_banned_tokens_are_never_sampled():
    meta = SamplingMetadata(temperature=torch.ones(DRAWS), all_greedy=False, all_random=True, num_logprobs=None,
                            banned=(torch.arange(DRAWS), torch.zeros(DRAWS, dtype=torch.int64)))
    tokens = Sampler(torch.device("cpu"), 0)(LOGITS.expand(DRAWS, -1).clone(), meta).token_ids
    assert 0 not in tokens.tolist()


class AllowFirstFour:
    """A TokenMask over every row: tokens 4 and up are forbidden."""

    def __init__(self, rows: int):
        self.rows = list(range(rows))

    def prepare(self, logits: torch.Tensor) -> None:
        """Nothing to fill."""

    def apply(self, logits: torch.Tensor) -> None:
        logits[:, 4:] = float("-inf")


def first_four_allowed(rows: int, **settings) -> SamplingMetadata:
    return SamplingMetadata(**settings, allowed=AllowFirstFour(rows), allowed_rows=torch.arange(rows))


def test_a_constrained_rows_runners_up_are_a_sample_of_what_its_token_leaves():
    """Had the matcher refused the sampled token i, the first runner-up is drawn from p without i: with the
    exponential race, P(j | i refused) = p_j / (1 - p_i) over the allowed tokens, and no forbidden one comes."""
    meta = first_four_allowed(DRAWS, temperature=torch.ones(DRAWS), all_greedy=False, all_random=True,
                              num_logprobs=None)
    samples = Sampler(torch.device("cpu"), 0)(LOGITS.expand(DRAWS, -1).clone(), meta)
    runners_up, valid = samples.runners_up.token_ids, samples.runners_up.valid
    assert samples.runners_up.rows == list(range(DRAWS)) and bool((runners_up[:, 0] == samples.token_ids).all())
    assert bool(valid[:, :4].all()) and not bool(valid[:, 4:].any())  # only 4 tokens are allowed at all
    allowed = torch.softmax(LOGITS[:4], -1)
    first = samples.token_ids == 0
    freqs = torch.bincount(runners_up[first, 1], minlength=4).float() / int(first.sum())
    assert close(freqs, torch.cat([torch.zeros(1), allowed[1:] / allowed[1:].sum()]))


def test_greedy_runners_up_go_down_the_masked_logits_and_carry_their_own_logprobs():
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.0, 9.0, -1.0], [4.0, 3.0, 2.0, 1.0, 0.0, 9.0]])
    meta = first_four_allowed(2, temperature=torch.zeros(2), all_greedy=True, all_random=False, num_logprobs=1)
    samples = Sampler(torch.device("cpu"), 0)(logits.clone(), meta)
    output = PendingSamplerOutput(samples.token_ids, samples.logprobs, [], samples.runners_up).result()
    assert output.token_ids == [1, 0]
    runners_up = output.runners_up
    assert runners_up.token_ids[:, :4].tolist() == [[1, 3, 2, 0], [0, 1, 2, 3]]
    assert not bool(runners_up.valid[:, 4:].any())  # the forbidden 4 and 5 come last, as what no row may take
    raw = torch.log_softmax(logits, -1)
    assert runners_up.logprobs[0, :4].tolist() == pytest.approx(raw[0, [1, 3, 2, 0]].tolist())
    assert runners_up.ranks[0, :4].tolist() == [2, 3, 4, 5]  # among all the raw logits, 9.0 first
    # the matcher refuses 1 and 3, takes 2: the row's token and its logprob become 2's
    assert output.take_runner_up(0, lambda token: token == 2)
    assert output.token_ids[0] == 2 and output.logprobs.token_ids[0] == 2 and output.logprobs.ranks[0] == 4
    assert output.logprobs.logprobs[0] == pytest.approx(float(raw[0, 2]))
    assert not output.take_runner_up(1, lambda token: False) and output.token_ids[1] == 0


def test_a_seeded_row_draws_the_same_tokens_wherever_it_sits_in_the_batch():
    def sample(row: int, batch: int) -> list[int]:
        generator = torch.Generator().manual_seed(1234)
        meta = SamplingMetadata(temperature=torch.ones(batch), all_greedy=False, all_random=True,
                                num_logprobs=None, generators={row: generator})
        sampler = Sampler(torch.device("cpu"), seed=row * 7 + batch)  # a different global stream each time
        return [int(sampler(LOGITS.expand(batch, -1).clone(), meta)[0][row]) for _ in range(40)]
    alone = sample(0, 1)
    assert sample(5, 8) == alone and sample(63, 64) == alone
    assert len(set(alone)) > 1


@pytest.mark.parametrize("vocab_size,world_size", [(7, 2), (8, 2), (10, 4), (5, 1)])
def test_greedy_tokens_from_vocabulary_slices_are_the_argmax_of_the_whole(monkeypatch, vocab_size, world_size):
    """Each rank's best (logit, token) decides, ties going to the lowest token id as argmax's do; the padding
    columns of the last slice never win."""
    import wde.core.layers.embedding as embedding
    rows = -(-vocab_size // world_size)
    g = torch.Generator().manual_seed(vocab_size)
    logits = torch.randint(-3, 3, (64, vocab_size), generator=g).to(torch.bfloat16)  # many ties across slices
    padded = torch.cat([logits, torch.full((64, rows * world_size - vocab_size), 100.0, dtype=logits.dtype)], 1)
    slices = padded.split(rows, dim=1)
    votes = {}
    monkeypatch.setattr(embedding, "get_tp_size", lambda: world_size)
    for rank in range(world_size):  # each rank's vote first, then every rank's answer from all the votes
        monkeypatch.setattr(embedding, "get_tp_rank", lambda rank=rank: rank)
        monkeypatch.setattr(embedding, "all_gather", lambda tensor, dim, rank=rank: votes.setdefault(rank, tensor))
        embedding.greedy_tokens(slices[rank], vocab_size)
    for rank in range(world_size):
        monkeypatch.setattr(embedding, "get_tp_rank", lambda rank=rank: rank)
        monkeypatch.setattr(embedding, "all_gather", lambda tensor, dim: torch.cat(
            [votes[r] for r in range(world_size)], dim))
        assert torch.equal(embedding.greedy_tokens(slices[rank], vocab_size), logits.float().argmax(dim=-1))
