"""Which replica of a data-parallel model takes a batch of requests: the least loaded one, unless the replica
that took the same prompt start last is at most AFFINITY_SLACK requests busier (its prefix cache may still
hold that start, which the others would compute again)."""
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

AFFINITY_SLACK = 4  # open requests a replica may have above the least loaded one and still take its prefixes
PREFIX_TOKENS = 256  # a prompt's start, as its affinity key: 16 KV blocks of 16 tokens
REMEMBERED_STARTS = 65_536  # prompt starts kept (the least recently routed forgotten first)


def prompt_start(prompt: Any) -> Hashable | None:
    """The affinity key of a prompt (token ids or text), None for a prompt of another form."""
    if isinstance(prompt, dict):
        prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
    if isinstance(prompt, list) and all(isinstance(token, int) for token in prompt[:PREFIX_TOKENS]):
        return tuple(prompt[:PREFIX_TOKENS])
    if isinstance(prompt, str):
        return prompt[:4 * PREFIX_TOKENS]  # about as many characters as PREFIX_TOKENS tokens hold
    return None


class ReplicaRouter:
    def __init__(self):
        self._last: OrderedDict[Hashable, int] = OrderedDict()  # prompt start -> the replica that took it last
        self._turn = 0  # where ties among the least loaded start: batches arriving together spread

    def choose(self, loads: list[int | None], start: Hashable | None) -> int:
        """The replica for a batch, from each replica's open requests (None: it stopped; one must be live)."""
        live = [index for index, load in enumerate(loads) if load is not None]
        self._turn += 1
        least = min(live, key=lambda index: (loads[index], (index - self._turn) % len(loads)))
        preferred = self._last.get(start) if start is not None else None
        near = preferred is not None and loads[preferred] is not None
        chosen = preferred if near and loads[preferred] <= loads[least] + AFFINITY_SLACK else least
        if start is not None:
            self._last[start] = chosen
            self._last.move_to_end(start)
            if len(self._last) > REMEMBERED_STARTS:
                self._last.popitem(last=False)
        return chosen
