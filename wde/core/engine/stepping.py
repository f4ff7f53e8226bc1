"""One step of any workflow: schedule, build the model input, run it, make the outputs; synchronously, or
overlapped with the device (`async_scheduling`).

Every stage that works on the whole step is guarded here: a request that breaks building the step's tensors
is found and fails alone; a step whose forward pass, sampling or pooling fails fails its own requests (the
prefix cache forgets the blocks it was to write), and the engine goes on with the next step.

Overlapped: while step k runs on the device, step k+1 is scheduled, built and launched, and then step k's
outputs are made while k+1 runs, so the device does not wait for the host between steps. What k+1 held back
(LaunchedStep.proceed: work that reads k's outputs on the host) is queued after them, k+1 still running.
"""
import logging
import time
from typing import Any

from wde.core import interfaces
from wde.core.engine.scheduler_output import SchedulerOutput
from wde.core.engine.stats import StepTimes
from wde.core.parallel.multiproc_executor import ExecutorDeadError

logger = logging.getLogger(__name__)


class SyncStepper(interfaces.Stepper):
    """Each step runs to its end before the next is scheduled."""

    @classmethod
    def from_engine(cls, engine) -> "SyncStepper":
        return cls(engine.config, engine.scheduler, engine.model_pre_processor, engine.executor,
                   engine.output_processor, engine.kv_cache_manager, engine.failures, engine.stats_tracker)

    def __init__(self, config, scheduler: interfaces.Scheduler, model_pre_processor: interfaces.ModelPreProcessor,
                 executor: interfaces.Executor, output_processor: interfaces.OutputProcessor, kv_cache_manager,
                 failures, stats_tracker):
        super().__init__(config)
        self.scheduler = scheduler
        self.model_pre_processor = model_pre_processor
        self.executor = executor
        self.output_processor = output_processor
        self.kv_cache_manager = kv_cache_manager
        self.failures = failures
        self.stats_tracker = stats_tracker
        self.times = StepTimes()

    def step(self) -> list[Any]:
        times = self.times
        start = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        model_output = None
        if scheduler_output.scheduled:
            model_input, scheduler_output = self.build_model_input(scheduler_output)
            scheduled = time.perf_counter()
            if model_input is not None:
                try:
                    model_output = self.executor.execute_model(model_input)
                except ExecutorDeadError:
                    raise  # a lost tensor-parallel rank: no step can run any more
                except Exception as e:  # noqa: BLE001 - the step's requests fail; the others keep being served
                    self.fail_step(scheduler_output, e)
            executed = time.perf_counter()
            times.schedule_s += scheduled - start
            times.execute_s += executed - scheduled
            times.num_steps += 1
            start = executed
        outputs = self.finish_step(scheduler_output, model_output)
        times.output_s += time.perf_counter() - start
        return outputs

    def build_model_input(self, scheduler_output: SchedulerOutput) -> tuple[Any, SchedulerOutput]:
        """(model input, the scheduler output it was built from). If building fails, each request is built
        alone, on a detached copy, to find the ones that fail (building is host work on the requests' own data,
        so it can be retried); they fail, and the step runs without them. (None, ...) when no request is
        left. A ModelPreProcessor writes nothing to a sequence unless its whole step is built."""
        try:
            return self.model_pre_processor(scheduler_output), scheduler_output
        except Exception as error:  # noqa: BLE001
            requests = scheduler_output.requests()
            culprits = {r.request_id: e for r in requests
                        if (e := self._build_error(scheduler_output.only({r.request_id}).detached())) is not None}
            if not culprits:  # none fails alone: their combination does, so they all fail
                culprits = {r.request_id: error for r in requests}
            for request in requests:
                if request.request_id in culprits:
                    self.failures.record(request, "building the step", culprits[request.request_id])
            rest = self._drop_from_step(scheduler_output, set(culprits))
            if not rest.scheduled:
                return None, rest
            try:
                return self.model_pre_processor(rest), rest
            except Exception as again:  # noqa: BLE001
                self.fail_step(rest, again, stage="building the step")
                return None, rest

    def _build_error(self, scheduler_output: SchedulerOutput) -> Exception | None:
        try:
            self.model_pre_processor(scheduler_output)
        except Exception as e:  # noqa: BLE001
            return e
        return None

    def _drop_from_step(self, scheduler_output: SchedulerOutput, failed: set[str]) -> SchedulerOutput:
        """The step without the failed requests. The blocks they were to write now stay unwritten: a request
        of the same step that shares one (a prefix it found cached, admitted after them) cannot run either,
        and the prefix cache forgets them all."""
        written = self._fail_readers_of(scheduler_output, failed, set(), "building the step",
                                        "the KV of its cached prefix was to be computed in this step by a request "
                                        "that failed")
        self.kv_cache_manager.forget(written)
        return scheduler_output.without(failed)

    def _fail_readers_of(self, step: SchedulerOutput, failed: set[str], unwritten: set[int], stage: str,
                         why: str) -> set[int]:
        """Fails each request of `step` that reads a block left unwritten (`unwritten`, or one that a failed
        request of `step` was to write), in turn, since what it writes is then unwritten too; `failed` gains
        their ids. Returns the blocks of `step` that its failed requests were to write."""
        block_size = self.kv_cache_manager.block_size
        unwritten = unwritten | step.written_blocks(failed, block_size)
        while readers := step.without(failed).requests_reading(unwritten):
            for reader in readers:
                self.failures.record(reader, stage, RuntimeError(why))
            new = {reader.request_id for reader in readers}
            failed |= new
            unwritten |= step.written_blocks(new, block_size)
        return step.written_blocks(failed, block_size)

    def fail_step(self, scheduler_output: SchedulerOutput, error: Exception, stage: str = "the model step") -> None:
        """A stage that works on the whole step failed: each of its requests that still waits for it fails with
        the error, and the prefix cache forgets the blocks the step was to write."""
        requests = scheduler_output.unfinished_requests()
        logger.error("%s failed; its %d requests fail", stage, len(requests), exc_info=error)
        for request in requests:
            self.failures.record(request, stage, error, log=False)
        self.kv_cache_manager.forget(scheduler_output.written_blocks(
            {r.request_id for r in scheduler_output.requests()}, self.kv_cache_manager.block_size))

    def finish_step(self, scheduler_output: SchedulerOutput, model_output: Any) -> list[Any]:
        """The step's outputs (none if it failed, or never ran: then its copies between the KV cache's tiers
        may not have run either, and what they were to fill is forgotten), then what it finished is freed."""
        outputs = []
        if model_output is None:
            self.kv_cache_manager.drop_copies(scheduler_output.block_copies)
        else:
            try:
                outputs = self.output_processor(scheduler_output, model_output)
            except Exception as e:  # noqa: BLE001 - a component that let a request's failure out: the step's fail
                self.fail_step(scheduler_output, e, stage="making the outputs")
        self.scheduler.free_finished(scheduler_output)
        self.stats_tracker.on_step(self.scheduler.get_stats())
        return outputs


class OverlappedStepper(SyncStepper):
    """With async scheduling, returns step k's outputs having launched step k+1; else each step to its end."""

    overlaps_steps = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.overlapped = self.config.args.async_scheduling
        self.in_flight: tuple[SchedulerOutput, interfaces.LaunchedStep] | None = None  # (its scheduler output, it)

    def step(self) -> list[Any]:
        return self._step_overlapped() if self.overlapped else super().step()

    def waits_for_last_step(self, scheduler_output: SchedulerOutput) -> bool:
        """Whether this step can be built only once the step in flight has made its outputs (a workflow whose
        step reads what the last one produced says so here)."""
        return False

    def reconcile(self, finished: SchedulerOutput, model_output: Any, launched: SchedulerOutput) -> None:
        """Step `finished` made its outputs after step `launched` was launched: a workflow whose outputs can
        make part of a launched step wrong (decoding: a token replaced on the host) sets that part aside here."""

    def _step_overlapped(self) -> list[Any]:
        times = self.times
        start = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        previous, self.in_flight = self.in_flight, None
        outputs: list[Any] = []
        if previous is not None and (not scheduler_output.scheduled or self.waits_for_last_step(scheduler_output)):
            outputs += self._finish_in_flight(previous, self._collect(previous, scheduler_output))
            previous = None
            # what that step finished has no blocks any more, and what failed with it will not go on: they leave
            scheduler_output.scheduled = [s for s in scheduler_output.scheduled if not s.seq.is_finished
                                          and not self.failures.has_failed(s.seq.request.request_id)]
        if not scheduler_output.scheduled:
            return outputs + self.finish_step(scheduler_output, None)
        model_input, scheduler_output = self.build_model_input(scheduler_output)
        scheduled = time.perf_counter()
        if model_input is not None:
            try:
                self.in_flight = (scheduler_output, self.executor.launch(model_input))
            except ExecutorDeadError:
                raise
            except Exception as e:  # noqa: BLE001
                self.fail_step(scheduler_output, e)
        if self.in_flight is None:  # nothing was launched: what this step scheduled is done with
            outputs += self.finish_step(scheduler_output, None)
        launched = self.in_flight[0] if self.in_flight is not None else None
        model_output = self._collect(previous, launched) if previous is not None else None
        collected = time.perf_counter()
        times.schedule_s += scheduled - start
        times.execute_s += collected - scheduled
        times.num_steps += 1
        outputs += self._finish_in_flight(previous, model_output)
        outputs += self._proceed(previous, model_output)
        times.output_s += time.perf_counter() - collected
        return outputs

    def _proceed(self, finished: tuple[SchedulerOutput, Any] | None, model_output: Any) -> list[Any]:
        """The launched step queues what it held back, now that the step before it made its outputs; if that
        fails, so do its requests (and the outputs of its end are returned)."""
        if self.in_flight is None:
            return []
        scheduler_output, launched = self.in_flight
        try:
            if finished is not None and model_output is not None:
                self.reconcile(finished[0], model_output, scheduler_output)
            launched.proceed()
        except ExecutorDeadError:
            raise
        except Exception as e:  # noqa: BLE001
            self.in_flight = None
            self.fail_step(scheduler_output, e)
            return self.finish_step(scheduler_output, None)
        return []

    def _collect(self, in_flight: tuple[SchedulerOutput, Any], later: SchedulerOutput | None) -> Any:
        """The launched step's model output, or None with its requests failed, and those of `later` (the step
        scheduled after it) that read what it was to write."""
        try:
            return in_flight[1].result()
        except ExecutorDeadError:
            raise
        except Exception as e:  # noqa: BLE001
            self.fail_step(in_flight[0], e)
            if later is not None:
                self._fail_readers(in_flight[0], later)
            return None

    def _fail_readers(self, failed: SchedulerOutput, later: SchedulerOutput) -> None:
        """Step `failed` failed once `later` was scheduled: a request of `later` that found blocks `failed` was
        writing as its cached prefix reads what that step left there; it fails too. What `later` writes for
        the failed requests is not what its hashes promise: the prefix cache forgets it (as fail_step does for
        the failed step's own blocks)."""
        gone = {request.request_id for request in failed.requests()}
        written = self._fail_readers_of(later, gone, failed.written_blocks(gone, self.kv_cache_manager.block_size),
                                        "the model step", "the KV of its cached prefix was to be computed by a step "
                                        "that failed")
        self.kv_cache_manager.forget(written)

    def _finish_in_flight(self, in_flight: tuple[SchedulerOutput, Any] | None, model_output: Any) -> list[Any]:
        """Outputs of a launched step whose results arrived (none for a step that failed: its requests did)."""
        return [] if in_flight is None else self.finish_step(in_flight[0], model_output)
