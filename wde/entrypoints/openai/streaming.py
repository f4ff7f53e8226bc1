"""A streamed request's outputs that its client has not read yet, joined: when the server or the client falls
behind the engine, the next event carries every token made meanwhile instead of one event per token, so the
events a stream costs shrink with the load (the stream's back-pressure) and nothing waits on a slow reader."""
from dataclasses import replace
from typing import Any

from wde.core.outputs import CompletionOutput, RequestOutput


def coalesce(waiting: list[Any]) -> list[Any]:
    """The outputs queued, one per request (in the order each first came), the deltas of each joined; an
    exception (the engine stopped) comes first and alone."""
    stopped = next((item for item in waiting if isinstance(item, Exception)), None)
    if stopped is not None:
        return [stopped]
    joined: dict[str, RequestOutput] = {}
    for output in waiting:
        earlier = joined.get(output.request_id)
        joined[output.request_id] = output if earlier is None else join(earlier, output)
    return list(joined.values())


def join(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive delta outputs of one request as one; a failure replaces what came before it."""
    if later.error:
        return later
    completions = {c.index: c for c in earlier.outputs}
    for completion in later.outputs:
        before = completions.get(completion.index)
        completions[completion.index] = completion if before is None else join_completions(before, completion)
    prompt_logprobs = earlier.prompt_logprobs if earlier.prompt_logprobs is not None else later.prompt_logprobs
    return replace(later, outputs=sorted(completions.values(), key=lambda c: c.index),
                   prompt_logprobs=prompt_logprobs)


def join_completions(before: CompletionOutput, after: CompletionOutput) -> CompletionOutput:
    logprobs = before.logprobs + after.logprobs if before.logprobs is not None and after.logprobs is not None \
        else before.logprobs or after.logprobs
    return replace(after, text=before.text + after.text, token_ids=before.token_ids + after.token_ids,
                   logprobs=logprobs)
