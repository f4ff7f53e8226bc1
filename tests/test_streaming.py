"""Streamed outputs a client has not read yet are joined: one output per request, its deltas in order."""
from wde.core.outputs import CompletionOutput, Logprob, RequestOutput
from wde.entrypoints.openai.served_engine import EngineStopped
from wde.entrypoints.openai.streaming import coalesce


def delta(request_id: str, text: str, token: int, finish: str | None = None, index: int = 0,
          prompt_logprobs=None) -> RequestOutput:
    completion = CompletionOutput(index, text, [token], logprobs=[{token: Logprob(-0.5, 1)}], finish_reason=finish)
    return RequestOutput(request_id, None, [1, 2], [completion], finish is not None, prompt_logprobs=prompt_logprobs)


def test_the_deltas_of_each_request_are_joined_in_order():
    waiting = [delta("a", "Hel", 1, prompt_logprobs=[None]), delta("b", "x", 7), delta("a", "lo", 2),
               delta("a", "!", 3, finish="stop"), delta("b", "y", 8, index=1)]
    a, b = coalesce(waiting)
    assert a.request_id == "a" and a.finished and a.prompt_logprobs == [None]
    [completion] = a.outputs
    assert (completion.text, completion.token_ids, completion.finish_reason) == ("Hello!", [1, 2, 3], "stop")
    assert [list(entry) for entry in completion.logprobs] == [[1], [2], [3]]
    assert [(c.index, c.text) for c in b.outputs] == [(0, "x"), (1, "y")] and not b.finished


def test_a_failure_or_a_stopped_engine_is_not_lost_in_a_join():
    failed = RequestOutput("a", None, [1], [], True, error="the request failed")
    assert coalesce([delta("a", "x", 1), failed]) == [failed]
    stopped = EngineStopped("killed")
    assert coalesce([delta("a", "x", 1), stopped, delta("a", "y", 2)]) == [stopped]
