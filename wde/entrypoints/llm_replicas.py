"""What LLM(data_parallel_size=N) runs on: N engine processes, each on GPUs of its own, started as `wde serve
--data-parallel-size N` starts them (process_engine.start_engines). Each prompt of a call goes to the replica
routing.py picks for it (the least loaded, or the one that took the same prompt start), and the LLM gets every
output back in input order. A replica that dies fails only the prompts it held (finish_reason "error", naming
it); the next calls go to the others.

The replicas' client side is asyncio (it is the server's); here it runs on an event loop in a thread of its
own, and the LLM's calls wait on it."""
import asyncio
import atexit
import threading
import weakref
from typing import Any, Callable

from wde.core.config import EngineArgs
from wde.core.engine.stats import EngineStats
from wde.core.outputs import CompletionOutput, PoolingRequestOutput, RequestOutput
from wde.entrypoints.openai.process_engine import start_engines
from wde.entrypoints.openai.served_engine import EngineStopped
from wde.entrypoints.openai.streaming import Outputs

Request = tuple[str, Any, Any]  # (request id, prompt, params)


class LLMReplicas:
    def __init__(self, args: EngineArgs):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wde-llm-replicas", daemon=True)
        self._thread.start()
        try:
            self.engine = start_engines({"llm": args})["llm"]  # a DataParallelEngine
        except BaseException:
            stop(None, self._loop, self._thread)
            raise
        self.task, self.workflow_name = self.engine.task, self.engine.info.workflow
        # the replicas stop with close(), when this is collected, or at exit: before multiprocessing's exit
        # handler, which would wait forever for processes that wait for this one to end
        self._close = weakref.finalize(self, stop, self.engine, self._loop, self._thread)
        atexit.register(self._close)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def run(self, requests: list[Request], on_finished: Callable[[Any], None]) -> dict[str, Any]:
        """Every request's final output by request id; `on_finished` sees each as it comes. Raises Refused
        (nothing runs) when a replica refuses one, EngineStopped when no replica is left."""
        self._check_open()
        future = asyncio.run_coroutine_threadsafe(self._run(requests, on_finished), self._loop)
        try:
            return future.result()
        except BaseException:  # Ctrl+C included: nothing of this call keeps running in the replicas
            future.cancel()
            self.engine.abort([request_id for request_id, _, _ in requests])
            raise

    def get_stats(self) -> EngineStats:
        self._check_open()
        return asyncio.run_coroutine_threadsafe(self.engine.stats(), self._loop).result()

    def close(self) -> None:
        self._close()
        atexit.unregister(self._close)

    def _check_open(self) -> None:
        if not self._close.alive:
            raise RuntimeError("this LLM was closed: its engine replicas have stopped")

    async def _run(self, requests: list[Request], on_finished: Callable[[Any], None]) -> dict[str, Any]:
        shares = await self.engine.add_spread(requests)
        finished: dict[str, Any] = {}
        await asyncio.gather(*(self._collect([requests[p] for p in positions], box, finished, on_finished)
                               for positions, box in shares))
        return finished

    async def _collect(self, share: list[Request], box: Outputs, finished: dict[str, Any],
                       on_finished: Callable[[Any], None]) -> None:
        """A share's outputs until all of its requests finished, or its replica stopped (the rest fail)."""
        waiting = {request_id for request_id, _, _ in share}
        while waiting:
            for item in await box.take_all():
                if isinstance(item, EngineStopped):
                    for request_id, prompt, _ in share:
                        if request_id in waiting:
                            finished[request_id] = stopped_output(self.task, request_id, prompt, str(item))
                            on_finished(finished[request_id])
                    return
                if item.finished:
                    waiting.discard(item.request_id)
                    finished[item.request_id] = item
                    on_finished(item)


def stop(engine, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """The replicas' processes, then the event loop and its thread."""
    if engine is not None:
        engine.stop()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def stopped_output(task: str, request_id: str, prompt: Any, reason: str) -> RequestOutput | PoolingRequestOutput:
    """A request whose replica stopped before it finished: failed, the engine's fault (not the request's)."""
    error = f"its engine replica stopped: {reason}"
    if task == "generate":
        return RequestOutput(request_id, prompt if isinstance(prompt, str) else None, [],
                             [CompletionOutput(0, "", [], finish_reason="error")], finished=True, error=error,
                             internal_error=True)
    return PoolingRequestOutput(request_id, None, [], error=error, internal_error=True)
