"""A reasoning model's constrained answer: its `<think>...</think>` is free, the constraint holds what follows.

Qwen3 and DeepSeek-R1 reason between <think> and </think> before they answer (`reasoning_parser`). Held to a
JSON schema from their first token, they could not reason at all: with a reasoning parser, a constrained
sequence is free while it reasons (from a <think> its prompt left open, or from one it starts its output with)
and follows the constraint from the </think> that ends the reasoning. Its first token may be <think> beside
what the constraint allows; a model that does not open one answers under the constraint from its first token.
"""
from dataclasses import dataclass

REASONING_TAGS = {"qwen3": ("<think>", "</think>"), "deepseek_r1": ("<think>", "</think>")}


@dataclass(frozen=True)
class ReasoningTokens:
    start: int
    end: int

    @classmethod
    def of(cls, parser: str, vocab: dict[str, int]) -> "ReasoningTokens":
        """The parser's tags as token ids of the vocabulary; ValueError if a tag is no single token."""
        tags = REASONING_TAGS[parser]
        missing = [tag for tag in tags if tag not in vocab]
        if missing:
            raise ValueError(f"reasoning_parser={parser!r}: the model's vocabulary has no {' or '.join(missing)} "
                             "token (it is not a reasoning model of that kind)")
        return cls(vocab[tags[0]], vocab[tags[1]])

    def open_in(self, token_ids: list[int]) -> bool:
        """Whether `token_ids` (a prompt) end inside a <think> they opened: the output starts as reasoning."""
        for token in reversed(token_ids):
            if token == self.end:
                return False
            if token == self.start:
                return True
        return False


class AfterReasoning:
    """A sequence's matcher behind its reasoning: takes every token while the sequence reasons, then hands
    them to the constraint's matcher (the GrammarMatcher protocol, so the OutputProcessor sees no difference)."""

    def __init__(self, matcher, tokens: ReasoningTokens, thinking: bool):
        self.matcher, self.tokens = matcher, tokens
        self.thinking = thinking  # inside <think>...</think>: nothing is constrained
        self.may_start = not thinking  # before the first token: it may open the reasoning

    def accept_token(self, token_id: int) -> bool:
        if self.thinking:
            self.thinking = token_id != self.tokens.end
            return True
        if self.may_start and token_id == self.tokens.start:
            self.may_start, self.thinking = False, True
            return True
        accepted = self.matcher.accept_token(token_id)
        self.may_start = self.may_start and not accepted  # a refused token (a runner-up comes next) starts nothing
        return accepted

    def is_terminated(self) -> bool:
        return not self.thinking and self.matcher.is_terminated()

    def is_completed(self) -> bool:
        return not self.thinking and self.matcher.is_completed()

    def mask_parts(self) -> tuple[object | None, int | None]:
        """(the matcher that masks the next token, None while reasoning: every token is allowed; a token the
        mask allows besides: <think>, before the first token)."""
        if self.thinking:
            return None, None
        return self.matcher, self.tokens.start if self.may_start else None
