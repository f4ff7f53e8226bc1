"""One model served by several replicas (`--data-parallel-size N`): each an engine process on GPUs of its own
(tensor_parallel_size each), one name to the clients. A batch of requests goes whole to one replica (adds are
all or none), the one routing.py picks by load and prompt start; a replica that dies fails only its own open
requests, the others take the new ones, and /health reports it."""
import asyncio
import os
import threading
from contextlib import contextmanager
from typing import Any

import torch

from wde.core.config import EngineArgs
from wde.core.engine.stats import EngineStats, merged_stats
from wde.entrypoints.openai.metrics import LatencyHistogram
from wde.entrypoints.openai.routing import ReplicaRouter, prompt_start
from wde.entrypoints.openai.served_engine import EngineStopped, Refused, ServedEngine
from wde.entrypoints.openai.streaming import Outputs

_ENVIRONMENT = threading.Lock()  # replicas start from threads: one at a time sets the environment it inherits


class DataParallelEngine(ServedEngine):
    def __init__(self, name: str, replicas: list[ServedEngine]):
        super().__init__(name, replicas[0].info)
        self.replicas = replicas
        self.router = ReplicaRouter()
        self._routing = [0] * len(replicas)  # requests sent to each replica that it has not taken yet
        self._last_stats: list[EngineStats | None] = [None] * len(replicas)  # each one's, as last read

    # the replicas keep the streams, latencies and failures: these read theirs (the setters take
    # ServedEngine's own defaults, which stay unused)
    @property
    def latency(self) -> LatencyHistogram:
        return LatencyHistogram.merged([replica.latency for replica in self.replicas])

    @latency.setter
    def latency(self, _: LatencyHistogram) -> None:
        pass

    @property
    def failure(self) -> str | None:
        if self.alive:
            return None
        return "; ".join(f"replica {index}: {reason}" for index, reason in self.stopped_replicas().items())

    @failure.setter
    def failure(self, _: str | None) -> None:
        pass

    @property
    def alive(self) -> bool:
        return any(replica.alive for replica in self.replicas)

    def stopped_replicas(self) -> dict[int, str]:
        return {index: replica.failure or "stopped" for index, replica in enumerate(self.replicas)
                if not replica.alive}

    def load(self, index: int) -> int | None:
        """Replica `index`'s open requests (None once it stopped)."""
        replica = self.replicas[index]
        return replica.num_open_requests + self._routing[index] if replica.alive else None

    def loads(self) -> list[int | None]:
        """Every replica's load; EngineStopped when none is left."""
        loads = [self.load(index) for index in range(len(self.replicas))]
        if all(load is None for load in loads):
            raise EngineStopped(self.failure)
        return loads

    async def add_requests(self, requests: list[tuple[str, Any, Any]]) -> Outputs:
        loads = self.loads()
        index = self.router.choose(loads, prompt_start(requests[0][1]))
        self._routing[index] += len(requests)
        try:
            return await self.replicas[index].add_requests(requests)
        finally:
            self._routing[index] -= len(requests)

    async def add_spread(self, requests: list[tuple[str, Any, Any]]) -> list[tuple[list[int], Outputs]]:
        """Add independent requests (an offline batch), each to the replica the router picks for it, counting
        those placed before it: one batch per replica, all or none (a refusal aborts the other replicas' shares
        and names the first request refused). Each share's positions in `requests`, with its outputs box; the
        box of a share whose replica stopped meanwhile holds only the EngineStopped (its requests fail, the
        others run)."""
        loads = self.loads()
        shares: dict[int, list[int]] = {}
        for position, (_, prompt, _) in enumerate(requests):
            index = self.router.choose(loads, prompt_start(prompt))
            loads[index] += 1
            shares.setdefault(index, []).append(position)
        for index, positions in shares.items():
            self._routing[index] += len(positions)
        try:
            boxes = await asyncio.gather(*(self.replicas[index].add_requests([requests[p] for p in positions])
                                           for index, positions in shares.items()), return_exceptions=True)
        finally:
            for index, positions in shares.items():
                self._routing[index] -= len(positions)
        refusals = [Refused(positions[box.index], box.error) for positions, box in zip(shares.values(), boxes)
                    if isinstance(box, Refused)]
        failed = next((box for box in boxes if isinstance(box, BaseException)
                       and not isinstance(box, (Refused, EngineStopped))), None)
        if refusals or failed:
            self.abort([request_id for request_id, _, _ in requests])
            raise min(refusals, key=lambda refused: refused.index) if refusals else failed
        return [(positions, box if isinstance(box, Outputs) else stopped_box(box))
                for positions, box in zip(shares.values(), boxes)]

    def abort(self, request_ids: list[str]) -> None:
        # to every replica: one that never had them ignores the ids, and one still taking their batch gets the
        # abort after the add
        for replica in self.replicas:
            if replica.alive:
                replica.abort(request_ids)

    async def stats(self) -> EngineStats:
        """The replicas' stats added up; a stopped one's counters as it last reported them."""
        live = [index for index, replica in enumerate(self.replicas) if replica.alive]
        if not live:
            raise EngineStopped(self.failure)
        for index, stats in zip(live, await asyncio.gather(*(self.replicas[index].stats() for index in live))):
            self._last_stats[index] = stats
        stopped = [s for index, s in enumerate(self._last_stats) if index not in live and s is not None]
        return merged_stats([self._last_stats[index] for index in live], stopped)

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()


def stopped_box(error: EngineStopped) -> Outputs:
    box = Outputs()
    box.put(error)
    return box


def replica_args(args: EngineArgs, index: int) -> tuple[EngineArgs, dict[str, str]]:
    """Replica `index`'s engine arguments and the environment its process starts with: on GPUs, the
    tensor_parallel_size GPUs of its own (of those this process sees), as CUDA_VISIBLE_DEVICES."""
    one = args.model_copy(update={"data_parallel_size": 1})
    on_gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    processes = args.data_parallel_size * args.tensor_parallel_size
    if not on_gpu:
        if processes > (os.cpu_count() or 1):
            raise ValueError(f"data_parallel_size={args.data_parallel_size} x tensor_parallel_size="
                             f"{args.tensor_parallel_size} makes {processes} engine processes on the CPU, more than "
                             f"its {os.cpu_count()} cores")
        return one, {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(gpu) for gpu in range(torch.cuda.device_count())]
    if processes > len(gpus):
        raise ValueError(f"data_parallel_size={args.data_parallel_size} x tensor_parallel_size="
                         f"{args.tensor_parallel_size} needs {processes} GPUs; {len(gpus)} are visible")
    size = args.tensor_parallel_size
    devices = gpus[index * size:(index + 1) * size]
    return one.model_copy(update={"device": "cuda"}), {"CUDA_VISIBLE_DEVICES": ",".join(devices)}


@contextmanager
def child_environment(variables: dict[str, str]):
    """os.environ with `variables` set, for a child process started inside (spawn copies it), then restored."""
    with _ENVIRONMENT:
        saved = {name: os.environ.get(name) for name in variables}
        os.environ.update(variables)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
