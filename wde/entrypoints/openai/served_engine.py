"""What the server sees of an engine: its name, task, context length and tokenizer, a way to add and abort
requests, and each request's outputs in a box its handler reads (streaming.Outputs).

Two kinds run behind it: AsyncEngine (the engine in a thread of this process, for tests and embedded use) and
ProcessEngine (the engine core in its own process, what `wde serve` runs). This class keeps what they share:
the outputs box of every open request and the hand-over of outputs to the event loop that waits on them.
"""
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from wde.core.engine.stats import EngineStats
from wde.entrypoints.openai.metrics import LatencyHistogram
from wde.entrypoints.openai.streaming import Outputs


@dataclass
class EngineInfo:
    """What the server needs of an engine, read once when it is ready."""

    task: str  # the workflow's task: "generate", "embed", "score" or "classify"
    max_model_len: int
    tokenizer: Any  # the engine's Tokenizer component (a ProcessEngine gets a copy from its process)
    labels: list[str] | None = None  # a classifier's class names, by class index
    workflow: str = ""  # the Workflow class's name, for messages

    @classmethod
    def of(cls, engine) -> "EngineInfo":
        labels = None
        if engine.workflow.task == "classify":
            names = getattr(engine.config.model.hf_config, "id2label", None) or {}
            labels = [str(names.get(i, i)) for i in range(len(names))] or None
        return cls(engine.workflow.task, engine.config.model.max_model_len, engine.tokenizer, labels,
                   engine.workflow.__name__)


@dataclass
class Stream:
    loop: asyncio.AbstractEventLoop
    outputs: Outputs
    started: float = field(default_factory=time.monotonic)
    prompt_token_ids: list[int] | None = None  # from its first output: later ones need not carry them


class ServedEngine:
    def __init__(self, name: str, info: EngineInfo):
        self.name, self.info = name, info
        self._streams: dict[str, Stream] = {}  # open requests; a finished or aborted one is dropped
        self.latency = LatencyHistogram()  # seconds from add to finish, of every finished request
        self.failure: str | None = None  # why the engine stopped, once it has

    @property
    def task(self) -> str:
        return self.info.task

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def tokenizer(self) -> Any:
        return self.info.tokenizer

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    @property
    def num_open_requests(self) -> int:
        return len(self._streams)

    def stopped_replicas(self) -> dict[int, str]:
        """Of a data-parallel engine (data_parallel.py), each replica that stopped, with why; else none."""
        return {}

    async def add_requests(self, requests: list[tuple[str, Any, Any]]) -> Outputs:
        """Add (request id, prompt, params) requests in one go, all or none: if the engine refuses one, none
        runs and Refused says which it was and why. The box gets the outputs of all of them, in the order the
        engine made them (or the exception that stopped the engine)."""
        raise NotImplementedError

    def abort(self, request_ids: list[str]) -> None:
        raise NotImplementedError

    async def stats(self) -> EngineStats:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def new_streams(self, count: int) -> list[Stream]:
        """Streams for a batch of requests, which share one outputs box: whoever reads it waits on one thing."""
        loop, outputs = asyncio.get_running_loop(), Outputs()
        return [Stream(loop, outputs) for _ in range(count)]

    def deliver(self, outputs: list) -> None:
        """Hand a step's outputs to the boxes of their requests, with one wake-up per event loop (a step of
        256 requests must not schedule 256 callbacks). Called by the thread that reads the engine's outputs."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        now = time.monotonic()
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # aborted meanwhile
                continue
            if stream.prompt_token_ids is None:
                stream.prompt_token_ids = output.prompt_token_ids
            elif not output.prompt_token_ids:
                output.prompt_token_ids = stream.prompt_token_ids
            if output.finished:
                del self._streams[output.request_id]
                self.latency.observe(now - stream.started)
            batches.setdefault(stream.loop, []).append((stream.outputs, output))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(put_all, items)

    def fail_all(self, error: Exception) -> None:
        """The engine stopped: every open request gets `error`."""
        streams, self._streams = self._streams, {}
        boxes = {id(stream.outputs): stream for stream in streams.values()}  # a batch's requests share one
        for stream in boxes.values():
            stream.loop.call_soon_threadsafe(stream.outputs.put, error)


class Refused(Exception):
    """The engine refused request `index` of a batch (and none of the batch runs): `error` says why."""

    def __init__(self, index: int, error: Exception):
        super().__init__(f"request {index}: {error}")
        self.index, self.error = index, error

    def __reduce__(self):
        """Sent from the engine's process: the error as a TypeError or ValueError when it was the client's, a
        RuntimeError otherwise (the error's own class may not survive pickling: pydantic's ValidationError does
        not)."""
        if isinstance(self.error, (ValueError, TypeError)):
            error = (TypeError if isinstance(self.error, TypeError) else ValueError)(str(self.error))
        else:
            error = RuntimeError(f"{type(self.error).__name__}: {self.error}")
        return Refused, (self.index, error)


class EngineStopped(Exception):
    """The engine cannot take or finish requests any more (its process died, or a step failed for all)."""


def add_all(engine, requests: list[tuple[str, Any, Any]]) -> Refused | None:
    """Add the requests to an LLMEngine, all or none: a refused one aborts those added before it."""
    for index, (request_id, prompt, params) in enumerate(requests):
        try:
            engine.add_request(request_id, prompt, params)
        except Exception as e:  # noqa: BLE001 - refused (ValueError / TypeError: the client's) or not: the
            # handler that submitted them gets the error, and the engine goes on
            for earlier, _, _ in requests[:index]:
                engine.abort_request(earlier)
            return Refused(index, e)
    return None


def put_all(items: list[tuple[Outputs, Any]]) -> None:
    for box, item in items:
        box.put(item)


def settle(future: asyncio.Future, error: Exception | None) -> None:
    if not future.done():
        future.set_exception(error) if error else future.set_result(None)
