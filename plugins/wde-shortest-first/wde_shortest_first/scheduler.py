"""Admit the shortest waiting prompt first: short requests stop queueing behind long ones.

Only the order in which new requests are admitted changes; how each one then runs (and so what it outputs) is
wde's own scheduling. A prompt's length is known without tokenizing when it comes as token ids; a text's is
estimated from its characters, so that submission stays free of tokenization.
"""
from wde.core.request import Request
from wde.workflows.decoding.scheduler import DecodingScheduler
from wde.workflows.decoding.sequence import Sequence

CHARS_PER_TOKEN = 4  # a rough estimate for English text


def prompt_length(request: Request) -> float:
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    return len(request.prompt) / CHARS_PER_TOKEN


class ShortestFirstScheduler(DecodingScheduler):
    def _next_waiting(self, output) -> Sequence | None:
        if not self.waiting and len(self.new_requests) > 1:
            shortest = min(self.new_requests, key=prompt_length)
            self.new_requests.remove(shortest)
            self.new_requests.appendleft(shortest)
        return super()._next_waiting(output)
