"""An LLMEngine driven by a background thread of this process, for an asyncio server in the same process
(tests, and programs that embed the server; `wde serve` runs the engine in its own process: ProcessEngine).

Handlers never touch the engine: they queue commands (add, abort) that the engine thread applies between steps,
and await the outputs it hands back, so a long step never blocks the event loop and the engine is never
entered from two threads.
"""
import asyncio
import logging
import threading
from collections import deque
from typing import Any

from wde.core.engine.llm_engine import LLMEngine
from wde.core.engine.stats import EngineStats
from wde.entrypoints.openai.served_engine import EngineInfo, EngineStopped, ServedEngine, add_all, settle
from wde.entrypoints.openai.streaming import Outputs

logger = logging.getLogger(__name__)


class AsyncEngine(ServedEngine):
    def __init__(self, engine: LLMEngine, name: str):
        super().__init__(name, EngineInfo.of(engine))
        self.engine = engine
        self._commands: deque = deque()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"wde-engine-{name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    async def add_requests(self, requests: list[tuple[str, Any, Any]]) -> Outputs:
        accepted, streams = asyncio.get_running_loop().create_future(), self.new_streams(len(requests))
        self._commands.append(("add", requests, accepted, streams))
        self._wake.set()
        if not self.alive:  # stopped before or while this was queued: its thread is not there to answer
            self._refuse_commands()
        await accepted
        return streams[0].outputs

    def abort(self, request_ids: list[str]) -> None:
        self._commands.append(("abort", request_ids))
        self._wake.set()

    async def stats(self) -> EngineStats:
        return self.engine.get_stats()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.close()

    def _apply_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "abort":
                for request_id in command[1]:
                    if self.engine.abort_request(request_id):
                        self._streams.pop(request_id, None)
                continue
            _, requests, accepted, streams = command
            refused = add_all(self.engine, requests)
            if refused is None:
                self._streams.update((request_id, stream) for (request_id, _, _), stream in zip(requests, streams))
            accepted.get_loop().call_soon_threadsafe(settle, accepted, refused)

    def _refuse_commands(self) -> None:
        """The engine stopped: adds queued meanwhile fail (their handlers must not wait for ever)."""
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "add":
                command[2].get_loop().call_soon_threadsafe(settle, command[2], EngineStopped(self.failure))

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
                self.fail_all(EngineStopped(self.failure))
                self._refuse_commands()
                return
            self.deliver(outputs)
