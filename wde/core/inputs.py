"""Checks on what users submit as a prompt, shared by every workflow's InputProcessor."""
import reprlib
from typing import Any, Union

import numpy as np

# a text, a list of token ids, or vLLM's dict forms {"prompt": text} / {"prompt_token_ids": ids}
PromptType = Union[str, list[int], dict]


def parse_prompt(prompt: Any, vocab_size: int) -> tuple[str | None, list[int] | None]:
    """Return (text, None) or (None, token ids); raise ValueError saying what is wrong with the prompt."""
    if isinstance(prompt, dict):
        unknown = set(prompt) - {"prompt", "prompt_token_ids"}
        if unknown or len(prompt) != 1:
            raise ValueError("a prompt dict must have exactly one key, 'prompt' or 'prompt_token_ids'; "
                             f"got {sorted(prompt)}")
        prompt = next(iter(prompt.values()))
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty")
        return check_text(prompt, "the prompt"), None
    if isinstance(prompt, (list, tuple)):
        return None, check_token_ids(list(prompt), vocab_size)
    raise TypeError(f"a prompt must be a str or a list of token ids, not {type(prompt).__name__}")


def check_token_ids(token_ids: list, vocab_size: int) -> list[int]:
    if not token_ids:
        raise ValueError("the prompt is empty (no token ids)")
    # numpy checks a long prompt at C speed; the element-by-element pass below only runs to name the culprit
    try:
        values = np.asarray(token_ids)
    except (ValueError, TypeError, OverflowError):  # ragged or exotic elements: the pass below names them
        values = None
    if values is not None and values.dtype.kind in "iu" and values.ndim == 1 and values.min() >= 0 \
            and values.max() < vocab_size:
        return token_ids
    for i, token in enumerate(token_ids):
        if not isinstance(token, int) or isinstance(token, bool):
            raise TypeError(f"prompt token {i} is {reprlib.repr(token)}, not an int")
        if not 0 <= token < vocab_size:
            raise ValueError(f"prompt token {i} is {reprlib.repr(token)}, outside the vocabulary [0, {vocab_size})")
    raise TypeError("prompt token ids must be a flat list of ints")


def check_text(text: str, what: str) -> str:
    """`text`, if it can be encoded as UTF-8 (a lone surrogate such as "\\ud800" cannot: no tokenizer takes
    it); else a ValueError that names `what` and where the bad character is."""
    if text.isascii():  # the usual case, checked without copying
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: character {e.start} is {text[e.start]!r} "
                         f"({e.reason})") from None
    return text


def coerce_params(params: Any, kind: type) -> Any:
    """A request's params as `kind` (SamplingParams, PoolingParams): None gives the defaults, a dict is
    validated into one."""
    if params is None:
        return kind()
    if isinstance(params, dict):
        return kind(**params)
    if not isinstance(params, kind):
        raise TypeError(f"params must be {kind.__name__}, not {type(params).__name__}")
    return params
