"""The outputs of a batch of requests on their way to the handler that reads them, and how a stream's unread
outputs are joined.

A stream reads everything that came since it last read, at once (`Outputs.take_all`), and `coalesce` joins it
into one output per request: when the server or the client falls behind the engine, the next event carries
every token made meanwhile instead of one event per token, so the events a stream costs shrink with the load
(the stream's back-pressure) and nothing waits on a slow reader.
"""
import asyncio
from typing import Any

from wde.core.outputs import CompletionOutput, RequestOutput


class Outputs:
    """What the engine made for a batch of requests and its handler has not read yet. Written on the event loop
    (the thread that reads the engine's outputs hands each step over in one callback), read by one handler.
    Not an asyncio.Queue: a stream takes all that waits in one go, and a queue's get_nowait, one item at a time,
    cost the server ~9 us per token once a stream had fallen behind."""

    def __init__(self):
        self._items: list[Any] = []
        self._waiter: asyncio.Future | None = None

    def put(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take_all(self, timeout: float | None = None) -> list[Any]:
        """Everything put since the last take, waiting for something if nothing is there ([] after `timeout`
        seconds of nothing)."""
        if not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            except asyncio.TimeoutError:
                return []
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items


def coalesce(waiting: list[Any]) -> list[Any]:
    """The outputs taken, one per request (in the order each first came), the deltas of each joined; an
    exception (the engine stopped) comes first and alone."""
    stopped = next((item for item in waiting if isinstance(item, Exception)), None)
    if stopped is not None:
        return [stopped]
    by_request: dict[str, list[RequestOutput]] = {}
    for output in waiting:
        by_request.setdefault(output.request_id, []).append(output)
    return [outputs[0] if len(outputs) == 1 else join(outputs) for outputs in by_request.values()]


def join(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive delta outputs of one request as one, made once (not pairwise: a stream that fell behind by
    many steps would copy its text once per step); a failure, always the last, replaces what came before it."""
    last = outputs[-1]
    if last.error:
        return last
    by_index: dict[int, list[CompletionOutput]] = {}
    for output in outputs:
        for completion in output.outputs:
            by_index.setdefault(completion.index, []).append(completion)
    prompt_logprobs = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    # made field by field: dataclasses.replace costs ~10x a constructor call, once per request per event
    return RequestOutput(last.request_id, last.prompt, last.prompt_token_ids,
                         [join_completions(by_index[index]) for index in sorted(by_index)], last.finished,
                         last.error, last.internal_error, prompt_logprobs, last.num_cached_tokens)


def join_completions(parts: list[CompletionOutput]) -> CompletionOutput:
    if len(parts) == 1:
        return parts[0]
    logprobs = [step for part in parts if part.logprobs is not None for step in part.logprobs]
    has_logprobs = any(part.logprobs is not None for part in parts)
    last = parts[-1]
    return CompletionOutput(last.index, "".join(part.text for part in parts),
                            [token for part in parts for token in part.token_ids], last.cumulative_logprob,
                            logprobs if has_logprobs else None, last.finish_reason, last.stop_reason)
