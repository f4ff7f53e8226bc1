"""The server's side of an engine core running in its own process (engine_process.py), what `wde serve` uses.

Requests go out as one message per batch (all the prompts of one HTTP request), outputs come back as one
message per step, read by a thread that hands them to the event loop in one wake-up. A monitor thread waits on
the process: if it dies, every open request fails with the reason, /health says so, and new requests get a
503. `stop()` ends the process (politely, then by signal); the process also ends itself when this one is gone.
"""
import asyncio
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import pickle
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import zmq

from wde.core.config import EngineArgs
from wde.core.engine.stats import EngineStats
from wde.core.outputs import RequestOutput
from wde.entrypoints.openai.data_parallel import DataParallelEngine, child_environment, replica_args
from wde.entrypoints.openai.engine_process import run_engine_process
from wde.entrypoints.openai.served_engine import EngineInfo, EngineStopped, Refused, ServedEngine, settle
from wde.entrypoints.openai.streaming import Outputs

logger = logging.getLogger(__name__)
READ_POLL_MS = 200  # how often the output reader checks whether it should stop


class ProcessEngine(ServedEngine):
    def __init__(self, args: EngineArgs, name: str, start_timeout_s: float = 1800.0,
                 environment: dict[str, str] | None = None, replica: int | None = None):
        """`environment`: variables the engine's process starts with (a data-parallel replica's GPUs);
        `replica`: its index among the replicas of its model, which its requests' errors name."""
        self._replica = replica
        self._folder = tempfile.mkdtemp(prefix="wde-engine-")  # mode 0700: only this user reaches the sockets
        self._context = zmq.Context()
        self._commands, self._outputs = self._context.socket(zmq.PUSH), self._context.socket(zmq.PULL)
        self._commands.setsockopt(zmq.SNDHWM, 0)  # no cap: a send waits only when the engine is not there
        self._commands.bind(f"ipc://{self._folder}/commands")
        self._outputs.bind(f"ipc://{self._folder}/outputs")
        self._process = multiprocessing.get_context("spawn").Process(  # spawn: CUDA cannot be forked
            target=run_engine_process, name=f"wde-engine-{name}",
            args=(args.model_dump(), f"ipc://{self._folder}/commands", f"ipc://{self._folder}/outputs",
                  logging.getLogger().getEffectiveLevel()))
        self._closing = False
        self._reaping = threading.Lock()
        with child_environment(environment or {}):
            self._process.start()
        logger.info("engine %s: process %d started, waiting for it to load the model", name, self._process.pid)
        try:
            info = self._wait_ready(start_timeout_s)
        except BaseException:
            self._close()
            raise
        super().__init__(name, info)
        self._decode = (msgspec.msgpack.Decoder(list[RequestOutput]).decode if info.task == "generate"
                        else pickle.loads)
        self._pending: dict[int, tuple[asyncio.Future, Any]] = {}  # token -> (future, what it waits for)
        self._tokens = itertools.count()
        self._lock = threading.Lock()  # the commands socket, _pending and the dying engine's hand-over
        self._aborted_while_adding: set[str] = set()  # aborted before the engine answered their add
        self._reader = threading.Thread(target=self._read, name=f"wde-outputs-{name}", daemon=True)
        self._reader.start()
        threading.Thread(target=self._watch, name=f"wde-watch-{name}", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self.failure is None and self._process.is_alive()

    @property
    def pid(self) -> int:
        return self._process.pid

    async def add_requests(self, requests: list[tuple[str, Any, Any]]) -> Outputs:
        streams = self.new_streams(len(requests))
        try:
            await self._call("add", requests, streams)
        except (pickle.PicklingError, TypeError, AttributeError) as e:  # the batch could not be sent: which one
            raise unpicklable(requests, e) from e
        return streams[0].outputs

    def abort(self, request_ids: list[str]) -> None:
        with self._lock:
            for request_id in request_ids:
                self._streams.pop(request_id, None)
            # those of an add the engine has not answered yet: its answer must not open their streams again
            adding = {request_id for _, (requests, streams) in self._pending.values() if streams is not None
                      for request_id, _, _ in requests}
            self._aborted_while_adding.update(adding.intersection(request_ids))
            if self.failure is None:
                self._send(("abort", None, request_ids))

    async def stats(self) -> EngineStats:
        return await self._call("stats", None, None)

    async def _call(self, kind: str, value: Any, waits_for: Any) -> Any:
        """Send a command the engine answers; its answer (an add's refusal raised)."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            if self.failure is not None:
                raise EngineStopped(self.failure)
            token = next(self._tokens)
            self._send((kind, token, value))
            self._pending[token] = (future, (value, waits_for))
        return await future

    def stop(self) -> None:
        if self._closing:
            return
        self._closing = True
        with self._lock:
            try:
                self._send(("stop", None, None))
            except EngineStopped:
                pass  # gone already
        self._close()

    def _send(self, command: tuple) -> None:
        """Queue a command for the engine, never waiting: with no engine process at the other end (it died a
        moment ago) the command fails instead of blocking the event loop."""
        try:
            self._commands.send(pickle.dumps(command), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise EngineStopped("the engine process is not connected") from None

    def _close(self) -> None:
        self._closing = True
        with self._reaping:  # one thread at a time waits for the process: two would race to reap it
            self._process.join(timeout=30)
            for stop_signal in (signal.SIGTERM, signal.SIGKILL):
                if self._process.is_alive():
                    logger.warning("engine process %d did not stop: sending %s", self._process.pid,
                                   stop_signal.name)
                    self._process.kill() if stop_signal is signal.SIGKILL else self._process.terminate()
                    self._process.join(timeout=10)
        reader = getattr(self, "_reader", None)  # not there when the engine failed to start
        if reader is not None:
            reader.join()  # it polls the sockets closed next; it sees _closing within READ_POLL_MS
        self._commands.close(linger=0)
        self._outputs.close(linger=0)
        self._context.term()
        shutil.rmtree(self._folder, ignore_errors=True)

    def _wait_ready(self, timeout_s: float) -> EngineInfo:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._outputs.poll(1000):
                kind, payload = self._outputs.recv_multipart()
                if kind == b"ready":
                    return pickle.loads(payload)
                raise ValueError(f"the engine could not start: {pickle.loads(payload)}")
            if not self._process.is_alive():
                raise RuntimeError(f"the engine process exited while starting ({exit_reason(self._process)}; its "
                                   "error is in the log above: a script that starts engine processes needs its code "
                                   "under `if __name__ == \"__main__\":`, as every spawned process imports it)")
        raise TimeoutError(f"the engine process was not ready after {timeout_s:.0f} s")

    def _read(self) -> None:
        try:
            self._read_outputs()
        except Exception as e:  # noqa: BLE001 - a message it cannot read: without this thread nothing moves
            logger.exception("engine %s: an output message could not be read", self.name)
            self._die(f"the server could not read the engine's outputs: {type(e).__name__}: {e}")

    def _read_outputs(self) -> None:
        while not self._closing and self.failure is None:
            if not self._outputs.poll(READ_POLL_MS):
                continue
            kind, *frames = self._outputs.recv_multipart(copy=False)
            if kind.bytes == b"dead":
                self._die(f"a step failed: {pickle.loads(frames[0].buffer)}")
                return
            replies, outputs = pickle.loads(frames[0].buffer), self._decode(frames[1].buffer)
            with self._lock:
                for token, value in replies:
                    self._answer(token, value)
            self.deliver(outputs)

    def _answer(self, token: int, value: Any) -> None:
        future, (requests, streams) = self._pending.pop(token)
        if streams is not None and value is None:  # an add the engine took: its outputs follow in this message
            self._streams.update((request_id, stream) for (request_id, _, _), stream in zip(requests, streams)
                                 if request_id not in self._aborted_while_adding)
        if streams is not None:
            self._aborted_while_adding.difference_update(request_id for request_id, _, _ in requests)
            future.get_loop().call_soon_threadsafe(settle, future, value)
        else:
            future.get_loop().call_soon_threadsafe(set_result, future, value)

    def _watch(self) -> None:
        multiprocessing.connection.wait([self._process.sentinel])  # waits without reaping: _close reaps
        with self._reaping:
            self._process.join()
        if not self._closing:
            self._die(f"the engine process exited ({exit_reason(self._process)})")

    def _die(self, reason: str) -> None:
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
            logger.error("engine %s stopped: %s; its open requests fail", self.name, reason)
            error = EngineStopped(reason if self._replica is None else f"replica {self._replica}: {reason}")
            self.fail_all(error)
            for future, _ in self._pending.values():
                future.get_loop().call_soon_threadsafe(settle, future, error)
            self._pending.clear()


def unpicklable(requests: list[tuple[str, Any, Any]], error: Exception) -> Exception:
    """The first request of a batch that cannot be pickled for the engine's process, refused (else `error`):
    looked for only once the batch's pickling failed."""
    for index, (_, prompt, _) in enumerate(requests):
        try:
            pickle.dumps(prompt)
        except Exception as e:  # noqa: BLE001 - pickling raises many kinds
            return Refused(index, TypeError(f"a prompt must be a str or a list of token ids, not "
                                            f"{type(prompt).__name__} ({e})"))
    return error


def exit_reason(process: multiprocessing.Process) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def start_engines(served: dict[str, EngineArgs]) -> dict[str, ServedEngine]:
    """One engine process per served model (per replica of one with data_parallel_size > 1), loading side by
    side; if one cannot start, the others are stopped and its error raised."""
    replicas = {name: [replica_args(args, index) for index in range(args.data_parallel_size)]
                for name, args in served.items()}
    with ThreadPoolExecutor(sum(map(len, replicas.values()))) as pool:
        starting = {(name, index): pool.submit(ProcessEngine, args, name if len(ones) == 1 else f"{name}/{index}",
                                               environment=environment, replica=None if len(ones) == 1 else index)
                    for name, ones in replicas.items() for index, (args, environment) in enumerate(ones)}
    started, errors = {}, []
    for key, future in starting.items():
        try:
            started[key] = future.result()
        except Exception as e:  # noqa: BLE001 - each start's own error, the first raised once all are back
            errors.append(e)
    if errors:
        for engine in started.values():
            engine.stop()
        raise errors[0]
    return {name: started[name, 0] if len(ones) == 1 else
            DataParallelEngine(name, [started[name, index] for index in range(len(ones))])
            for name, ones in replicas.items()}
