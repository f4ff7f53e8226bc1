"""Tensor parallelism: the model split over `tensor_parallel_size` processes, one device each.

Rank 0 lives in the engine's process: it schedules, sends each step's input to the other ranks
(tensor_broadcast.py), runs its own share of the step, and samples. The other ranks are worker processes
(spawned here, or started by torchrun, whose environment this executor joins instead of spawning) that run the
same model shard on every input they receive.

Lifetime: the workers stop when the engine is closed, garbage-collected or its process exits; a worker also
stops when rank 0's process disappears. Any rank failing ends the group: the error of the failing rank is
raised in the caller, as ExecutorDeadError, and no process is left behind.
"""
import logging
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.distributed as dist

from wde.core import interfaces
from wde.core.config import EngineConfig
from wde.core.layers.linear import check_tensor_parallel_shapes
from wde.core.parallel.distributed import TIMEOUT, destroy_tensor_parallel, init_tensor_parallel
from wde.core.parallel.tensor_broadcast import TensorBroadcaster
from wde.core.registry import resolve_model_class

logger = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class ExecutorDeadError(RuntimeError):
    """A tensor-parallel rank failed; the engine cannot run further steps."""


def check_can_split(config: EngineConfig) -> None:
    """A clear error, before any process starts, for a model that cannot be split this way."""
    model, world_size = config.model, config.args.tensor_parallel_size
    model_class = resolve_model_class(model.architecture, model.task)
    if not getattr(model_class, "supports_tensor_parallel", False):
        raise ValueError(f"{model_class.__name__} does not support tensor parallelism (tensor_parallel_size="
                         f"{world_size}); run it with tensor_parallel_size=1")
    check_tensor_parallel_shapes(model.num_heads, model.num_kv_heads, world_size)
    experts = getattr(model.hf_config, "num_experts", None) or getattr(model.hf_config, "num_local_experts", None)
    if config.args.enable_expert_parallel and experts and experts < world_size:
        raise ValueError(f"enable_expert_parallel: {experts} experts cannot be shared by {world_size} ranks (one "
                         "expert at least for each); leave it off to slice every expert over the ranks")
    if config.device.type == "cuda" and torch.cuda.device_count() < world_size and not under_torchrun():
        raise ValueError(f"tensor_parallel_size={world_size} needs {world_size} GPUs; "
                         f"{torch.cuda.device_count()} are visible")


def under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    if config.device.type != "cuda":
        return config.device
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def build_rank_worker(config: EngineConfig, components: dict[str, type]) -> interfaces.Worker:
    """This rank's Worker, from the engine's resolved pipeline (the classes rank 0 chose)."""
    return components["Worker"](config, components)


def agree_on_kv_blocks(worker: interfaces.Worker) -> int:
    """Every rank sizes its own cache; all use the smallest count, so block tables mean the same everywhere.
    Each also checks, before any has pinned its host tier, that the tiers of all ranks on its host fit there
    together (a check per rank would pass each of N tiers that only fit one at a time); if one does not, every
    rank raises."""
    from wde.core.kv_cache.host_pool import host_tier_shortfall
    world_size = torch.distributed.get_world_size()
    ranks_on_host = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))  # spawned workers share rank 0's host
    host_blocks = worker.num_host_kv_blocks()
    shortfall = host_tier_shortfall(host_blocks * worker.kv_block_bytes(), ranks_on_host) if host_blocks else None
    agreed = torch.tensor([worker.determine_num_kv_blocks(), shortfall is None], dtype=torch.int64,
                          device=worker.device)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
    if not agreed[1]:
        raise ValueError(shortfall or "the KV cache's host tier does not fit the host memory of another rank: lower "
                                      "kv_offload_gib or num_kv_offload_blocks")
    count = int(agreed[0])
    worker.init_kv_cache(count)
    return count


def serve_steps(config: EngineConfig, components: dict[str, type], rank: int) -> None:
    """A worker rank's life: build the shard, then run every step rank 0 sends until it says stop."""
    from wde.core.plugins import load_plugins
    load_plugins()  # plugins' registrations must exist in every rank
    worker = build_rank_worker(config, components)
    agree_on_kv_blocks(worker)
    receiver = TensorBroadcaster()
    while (model_input := receiver.receive()) is not None:
        worker.execute_model(model_input)


class WorkerProcesses:
    """The spawned ranks 1..N-1 (`python -m wde.core.parallel.tp_worker`), stopped by close()."""

    def __init__(self, world_size: int, port: int, config: EngineConfig, components: dict[str, type]):
        self.error_dir = tempfile.mkdtemp(prefix="wde-tp-")
        self.processes = []
        for rank in range(1, world_size):
            args = {"rank": rank, "world_size": world_size, "port": port, "config": config,
                    "components": components, "error_file": self.error_file(rank)}
            # the parent's import path, so workflows and plugins defined anywhere it can import resolve there too
            environment = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            process = subprocess.Popen([sys.executable, "-m", "wde.core.parallel.tp_worker"], stdin=subprocess.PIPE,
                                       env=environment)
            process.stdin.write(pickle.dumps(args))
            process.stdin.close()
            self.processes.append(process)

    def error_file(self, rank: int) -> str:
        return os.path.join(self.error_dir, f"rank-{rank}.txt")

    def first_error(self, wait_s: float = 2.0) -> str | None:
        """The traceback of a rank that failed, waiting a little for it to be written."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, process in enumerate(self.processes, start=1):
                if os.path.exists(self.error_file(rank)) and process.poll() is not None:
                    with open(self.error_file(rank)) as f:
                        return f"tensor-parallel rank {rank} failed:\n{f.read()}"
            dead = [(rank, p) for rank, p in enumerate(self.processes, start=1) if p.poll() not in (None, 0)]
            if time.monotonic() > deadline:
                return f"tensor-parallel rank {dead[0][0]} exited with {dead[0][1].returncode}" if dead else None
            time.sleep(0.05)

    def wait_until_ready(self, store: dist.TCPStore) -> None:
        """Wait for every rank to reach the store, failing at once (with its error) if one dies first."""
        keys = [f"ready-{rank}" for rank in range(1, len(self.processes) + 1)]
        deadline = time.monotonic() + TIMEOUT.total_seconds()
        while not store.check(keys):
            if any(p.poll() is not None for p in self.processes) or time.monotonic() > deadline:
                error = self.first_error() or "a tensor-parallel rank did not start in time"
                self.close(timeout_s=0.0)
                raise ExecutorDeadError(error)
            time.sleep(0.05)

    def close(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiprocExecutor(interfaces.Executor):
    supports_tensor_parallel = True

    def __init__(self, config: EngineConfig, components: dict[str, type]):
        super().__init__(config, components)
        check_can_split(config)
        world_size = config.args.tensor_parallel_size
        self.workers: WorkerProcesses | None = None
        store = None
        if under_torchrun():
            rank = int(os.environ["RANK"])
            if int(os.environ["WORLD_SIZE"]) != world_size:
                raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} processes for tensor_parallel_size="
                                 f"{world_size}")
        else:
            rank, port = 0, free_port()
            store = dist.TCPStore("127.0.0.1", port, world_size, is_master=True, timeout=TIMEOUT,
                                  wait_for_workers=False)
            self.workers = WorkerProcesses(world_size, port, config, components)
            self.workers.wait_until_ready(store)
        rank_config = replace(config, device=rank_device(config, rank))
        init_tensor_parallel(rank, world_size, rank_config.device, store, config.args.enable_expert_parallel)
        logger.info("tensor parallel: rank %d of %d on %s (%s)", rank, world_size, rank_config.device,
                    "torchrun" if under_torchrun() else "spawned workers")
        if rank != 0:  # under torchrun, ranks 1..N-1 serve rank 0's steps and then end their process
            serve_steps(rank_config, components, rank)
            destroy_tensor_parallel()
            sys.exit(0)
        try:
            self.worker = build_rank_worker(rank_config, components)
            self.num_kv_blocks = agree_on_kv_blocks(self.worker)
            self.kv_layer_groups = self.worker.kv_layer_groups
            self.num_host_kv_blocks = self.worker.num_host_kv_blocks()  # the same on every rank: same shards
            self.host_kv_block_bytes = world_size * self.worker.kv_block_bytes() if self.num_host_kv_blocks else 0
        except BaseException as e:  # a rank 0 that cannot build its worker leaves no group or processes behind
            # a rank that failed first (its share of the weights would not load) broke rank 0's collective:
            # its error is the one to report
            error = self.workers.first_error() if self.workers else None
            if self.workers:
                self.workers.close(timeout_s=0.0)
            destroy_tensor_parallel()
            if error:
                raise ExecutorDeadError(error) from e
            raise
        self.broadcaster = TensorBroadcaster()
        self.dead: str | None = None
        self._finalizer = weakref.finalize(self, _stop, self.broadcaster, self.workers)

    def execute_model(self, model_input: Any) -> Any:
        return self._run_step(model_input, self.worker.execute_model)

    def launch(self, model_input: Any) -> interfaces.LaunchedStep:
        return self._run_step(model_input, self.worker.launch)

    def _run_step(self, model_input: Any, run: Callable[[Any], Any]) -> Any:
        if self.dead:
            raise ExecutorDeadError(self.dead)
        try:
            self.broadcaster.send(model_input.for_workers())
            return run(model_input)
        except Exception as e:  # one rank failing leaves the others stuck in a collective: end them all
            self.dead = (self.workers.first_error() if self.workers else None) or f"{type(e).__name__}: {e}"
            self.shutdown(graceful=False)
            raise ExecutorDeadError(self.dead) from e

    def host_copy_wait_s(self) -> float:
        return self.worker.host_copy_wait_s()  # rank 0's: every rank's step waits for its own copies alike

    def shutdown(self, graceful: bool = True) -> None:
        if graceful:
            self._finalizer()
        else:
            self._finalizer.detach()
            if self.workers:
                self.workers.close(timeout_s=0.0)
            destroy_tensor_parallel()


def _stop(broadcaster: TensorBroadcaster, workers: WorkerProcesses | None) -> None:
    try:
        broadcaster.send_stop()
    except Exception:  # noqa: BLE001 (a rank already gone: nothing to tell it)
        pass
    if workers:
        workers.close()
    destroy_tensor_parallel()
