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

    async def add_request(self, request_id: str, prompt: Any, params: Any) -> asyncio.Queue:
        """Queue a request; raises the engine's ValueError / TypeError if it refuses it (or, for a fault of the
        engine's own, whatever it raised)."""
        loop = asyncio.get_running_loop()
        accepted, stream = loop.create_future(), Stream(loop, asyncio.Queue())
        self._commands.append(("add", request_id, prompt, params, accepted, stream))
        self._wake.set()
        await accepted
        return stream.queue

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
            _, request_id, prompt, params, accepted, stream = command
            try:
                self.engine.add_request(request_id, prompt, params)
            except Exception as e:  # noqa: BLE001 - refused (ValueError / TypeError: the client's) or not: the
                # handler that submitted it gets the error, and the engine thread goes on
                stream.loop.call_soon_threadsafe(_settle, accepted, e)
                continue
            self._streams[request_id] = stream
            stream.loop.call_soon_threadsafe(_settle, accepted, None)

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


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if not future.done():
        future.set_exception(error) if error else future.set_result(None)
