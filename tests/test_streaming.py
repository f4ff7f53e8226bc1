"""Streamed outputs a client has not read yet are taken at once and joined: one output per request, its deltas
in order."""
import asyncio

from wde.core.outputs import CompletionOutput, Logprob, RequestOutput
from wde.entrypoints.openai.served_engine import EngineStopped
from wde.entrypoints.openai.streaming import Outputs, coalesce


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


def test_completions_without_logprobs_join_to_none_and_with_them_keep_every_step():
    plain = [RequestOutput("a", None, [1], [CompletionOutput(0, t, [i])], False) for i, t in enumerate("abc")]
    [joined] = coalesce(plain)
    assert (joined.outputs[0].text, joined.outputs[0].token_ids, joined.outputs[0].logprobs) == ("abc", [0, 1, 2],
                                                                                                 None)
    [joined] = coalesce([delta("a", "x", 1), plain[1], delta("a", "y", 3)])  # a step without: no entry lost
    assert [list(entry) for entry in joined.outputs[0].logprobs] == [[1], [3]]


def test_outputs_are_taken_all_at_once_and_a_take_waits_for_the_next_put():
    async def scenario():
        box = Outputs()
        box.put(1)
        box.put(2)
        assert await box.take_all() == [1, 2]
        assert await box.take_all(timeout=0.01) == []  # nothing came
        asyncio.get_running_loop().call_later(0.01, box.put, 3)
        assert await box.take_all() == [3]  # woken by the put
    asyncio.run(scenario())
