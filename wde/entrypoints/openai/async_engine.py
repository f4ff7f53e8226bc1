"""An LLMEngine driven by a background thread, for an asyncio server.

Handlers never touch the engine: they queue commands (add, abort) that the engine thread applies between steps,
and await the outputs it hands back, so a long step never blocks the event loop and the engine is never
entered from two threads.
"""
import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from wde.core.engine.llm_engine import LLMEngine
from wde.entrypoints.openai.metrics import LatencyHistogram

logger = logging.getLogger(__name__)


@dataclass
class Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    started: float = field(default_factory=time.monotonic)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, name: str):
        self.engine, self.name = engine, name
        self._commands: deque = deque()
        self._streams: dict[str, Stream] = {}
        self._wake = threading.Event()
        self._stopped = False
        self.latency = LatencyHistogram()  # seconds from add to finish, of every finished request
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"wde-engine-{name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    async def add_requests(self, requests: list[tuple[str, Any, Any]]) -> list[asyncio.Queue]:
        """Queue (request id, prompt, params) requests, all applied by the engine thread in one go before its
        next step (one request per step would leave a batch waiting for as many steps); all or none: if the
        engine refuses one, those before it are aborted and Refused says which it was and why."""
        loop = asyncio.get_running_loop()
        accepted, streams = loop.create_future(), [Stream(loop, asyncio.Queue()) for _ in requests]
        self._commands.append(("add", requests, accepted, streams))
        self._wake.set()
        await accepted
        return [stream.queue for stream in streams]

    def abort(self, request_id: str) -> None:
        self._commands.append(("abort", request_id))
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.close()

    def _apply_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "abort":
                if self.engine.abort_request(command[1]):
                    self._streams.pop(command[1], None)
                continue
            _, requests, accepted, streams = command
            accepted.get_loop().call_soon_threadsafe(_settle, accepted, self._add_all(requests, streams))

    def _add_all(self, requests: list[tuple[str, Any, Any]], streams: list[Stream]) -> "Refused | None":
        for index, ((request_id, prompt, params), stream) in enumerate(zip(requests, streams)):
            try:
                self.engine.add_request(request_id, prompt, params)
            except Exception as e:  # noqa: BLE001 - refused (ValueError / TypeError: the client's) or not: the
                # handler that submitted them gets the error, and the engine thread goes on
                for earlier, _, _ in requests[:index]:
                    self.engine.abort_request(earlier)
                    self._streams.pop(earlier, None)
                return Refused(index, e)
            self._streams[request_id] = stream
        return None

    def _run(self) -> None:
        while not self._stopped:
            self._apply_commands()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # the engine cannot go on (a lost tensor-parallel rank): fail every request
                logger.exception("engine %s stopped", self.name)
                self.failure = f"{type(e).__name__}: {e}"
                for stream in self._streams.values():
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, e)
                return
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                if output.finished:
                    del self._streams[output.request_id]
                    self.latency.observe(time.monotonic() - stream.started)
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, output)


class Refused(Exception):
    """The engine refused request `index` of a batch (and none of the batch runs): `error` says why."""

    def __init__(self, index: int, error: Exception):
        super().__init__(f"request {index}: {error}")
        self.index, self.error = index, error


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if not future.done():
        future.set_exception(error) if error else future.set_result(None)
