"""LLMEngine: builds a Workflow's components and drives them one step at a time."""
import logging
import time
from dataclasses import replace
from typing import Any

from wde.core.attention.selector import select_attention_backend
from wde.core.config import EngineArgs, EngineConfig
from wde.core.dotted_path import import_object
from wde.core.engine.failures import RequestFailures
from wde.core.parallel.multiproc_executor import ExecutorDeadError
from wde.core.outputs import RequestOutput
from wde.core.plugins import load_plugins
from wde.core.registry import resolve_model_class, resolve_workflow, workflow_path
from wde.core.request import Request
from wde.core.engine.stats import EngineStats, StatsTracker, StepTimes
from wde.core.workflow import Workflow, WorkflowError

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, workflow: type[Workflow], config: EngineConfig):
        self.workflow = workflow
        self.components = workflow.resolve()  # every slot imported and checked before any weight is read
        self.config = config
        resolve_model_class(config.model.architecture, config.args.task)
        self.components["AttentionBackend"] = select_attention_backend(config, self.components["AttentionBackend"])
        logger.info("workflow %s for %s on %s", workflow.__qualname__, config.model.architecture, config.device)
        self.failures = RequestFailures()  # the one place a request's failure is recorded, until step() reports it
        build = lambda slot: self.components[slot].from_engine(self)  # noqa: E731
        self.tokenizer = build("Tokenizer")
        self.executor = build("Executor")  # loads the model and allocates the KV cache
        self.kv_cache_manager = build("KVCacheManager")
        self.request_processor = build("RequestProcessor")
        self.scheduler = build("Scheduler")
        self.input_processor = build("InputProcessor")
        self.model_pre_processor = build("ModelPreProcessor")
        self.output_processor = build("OutputProcessor")
        self.stats_tracker = StatsTracker(log=not config.args.disable_log_stats)
        self.step_times = StepTimes()
        self.async_scheduling = config.args.async_scheduling and hasattr(self.model_pre_processor,
                                                                        "needs_known_tokens")
        if config.args.async_scheduling:
            logger.info("async scheduling %s", "on" if self.async_scheduling else
                        f"off: {workflow.__qualname__} has no step whose input depends on the last one's output")
        self.in_flight: tuple[Any, Any] | None = None  # async scheduling: (scheduler output, launched step)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs | None = None, **kwargs: Any) -> "LLMEngine":
        """An engine for the model's architecture, with the Workflow the registry names for it (or the one
        `workflow=` names)."""
        load_plugins()
        args = engine_args.model_copy(update=kwargs) if engine_args else EngineArgs(**kwargs)
        config = EngineConfig.from_args(EngineArgs.model_validate(args.model_dump()))
        if config.args.workflow:
            return cls.from_workflow(workflow_path(config.args.workflow), config=config)
        return cls(resolve_workflow(config.model.architecture, config.args.task), config)

    @classmethod
    def from_workflow(cls, workflow: type[Workflow] | str, config: EngineConfig | None = None,
                      **kwargs: Any) -> "LLMEngine":
        """An engine that runs `workflow` (a Workflow class or its "package.module:Name" path)."""
        load_plugins()
        if isinstance(workflow, str):
            try:
                workflow = import_object(workflow)
            except (ImportError, AttributeError, ValueError) as e:
                raise WorkflowError(f"workflow {workflow!r} cannot be imported: {e}") from e
        if not (isinstance(workflow, type) and issubclass(workflow, Workflow)):
            raise TypeError(f"{workflow!r} is not a Workflow subclass")
        workflow.resolve()  # fail on a bad slot before reading the model
        return cls(workflow, config or EngineConfig.from_args(EngineArgs(**kwargs)))

    def add_request(self, request_id: str, prompt: Any, params: Any = None) -> None:
        """Queue a request; raises ValueError / TypeError at once, naming what is wrong, for a bad prompt or
        params (whatever the input processor tripped on: nothing else a request carries reaches the caller)."""
        try:
            request = self.input_processor(str(request_id), prompt, params, time.time())
        except (ValueError, TypeError):
            raise
        except Exception as e:  # noqa: BLE001 - e.g. RecursionError on a prompt nested thousands deep
            raise ValueError(f"the request could not be read: {type(e).__name__}: {e}") from e
        self.scheduler.add_request(request)

    def process_request(self, request: Request) -> Any:
        """The RequestProcessor's state of `request` (tokenized, checked), or None if it failed there: the
        scheduler forgets it, and the step reports the failure. Schedulers call this, lazily, at schedule time."""
        return self.failures.guard(request, "request processing", self.request_processor, request)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request in whatever state it is and free its KV blocks; False if it was not found."""
        return self.scheduler.abort_request(str(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Run one step; return the outputs it made, and one failed output for each request that failed in
        it, at whatever stage (its KV blocks are freed; the other requests go on)."""
        outputs = self._step_overlapped() if self.async_scheduling else self._step_sync()
        return outputs + self._report_failures()

    def _step_sync(self) -> list[RequestOutput]:
        times = self.step_times
        start = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        model_output = None
        if scheduler_output.scheduled:
            model_input, scheduler_output = self._build_model_input(scheduler_output)
            scheduled = time.perf_counter()
            if model_input is not None:
                try:
                    model_output = self.executor.execute_model(model_input)
                except ExecutorDeadError:
                    raise  # a lost tensor-parallel rank: no step can run any more
                except Exception as e:  # noqa: BLE001 - the step's requests fail; the others keep being served
                    self._fail_step(scheduler_output, e)
            executed = time.perf_counter()
            times.schedule_s += scheduled - start
            times.execute_s += executed - scheduled
            times.num_steps += 1
            start = executed
        outputs = self._finish_step(scheduler_output, model_output)
        times.output_s += time.perf_counter() - start
        return outputs

    def _step_overlapped(self) -> list[RequestOutput]:
        """Async scheduling: step k+1 is scheduled, built and launched while step k runs on the device (rows
        whose input is a token step k samples take it from k's samples on the device), then step k's outputs
        are made while k+1 runs. A sequence that step k stops (EOS, stop string) was already in k+1: that row's
        token is dropped. Returns step k's outputs."""
        times = self.step_times
        start = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        previous, self.in_flight = self.in_flight, None
        outputs: list[RequestOutput] = []
        if previous is not None and (not scheduler_output.scheduled
                                     or self.model_pre_processor.needs_known_tokens(scheduler_output)):
            outputs += self._finish_in_flight(previous, self._collect(previous))
            previous = None
            # what that step stopped has no blocks any more: it leaves this step
            scheduler_output.scheduled = [s for s in scheduler_output.scheduled if not s.seq.is_finished]
        if not scheduler_output.scheduled:
            return outputs + self._finish_step(scheduler_output, None)
        model_input, scheduler_output = self._build_model_input(scheduler_output)
        scheduled = time.perf_counter()
        if model_input is not None:
            try:
                self.in_flight = (scheduler_output, self.executor.launch(model_input))
            except ExecutorDeadError:
                raise
            except Exception as e:  # noqa: BLE001
                self._fail_step(scheduler_output, e)
        if self.in_flight is None:  # nothing was launched: what this step scheduled is done with
            outputs += self._finish_step(scheduler_output, None)
        sampled = self._collect(previous) if previous is not None else None
        collected = time.perf_counter()
        times.schedule_s += scheduled - start
        times.execute_s += collected - scheduled
        times.num_steps += 1
        outputs += self._finish_in_flight(previous, sampled)
        times.output_s += time.perf_counter() - collected
        return outputs

    def _collect(self, in_flight: tuple[Any, Any]) -> Any:
        """The launched step's sampled tokens, or None with its requests failed."""
        try:
            return in_flight[1].result()
        except ExecutorDeadError:
            raise
        except Exception as e:  # noqa: BLE001
            self._fail_step(in_flight[0], e)
            return None

    def _finish_in_flight(self, in_flight: tuple[Any, Any] | None, sampled: Any) -> list[RequestOutput]:
        """Outputs of a launched step whose tokens arrived (none for a step that failed: its requests did)."""
        return [] if in_flight is None else self._finish_step(in_flight[0], sampled)

    def _build_model_input(self, scheduler_output: Any) -> tuple[Any, Any]:
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
                self._fail_step(rest, again, stage="building the step")
                return None, rest

    def _build_error(self, scheduler_output: Any) -> Exception | None:
        try:
            self.model_pre_processor(scheduler_output)
        except Exception as e:  # noqa: BLE001
            return e
        return None

    def _drop_from_step(self, scheduler_output: Any, failed: set[str]) -> Any:
        """The step without the failed requests. The blocks they were to write now stay unwritten: a request
        of the same step that shares one (a prefix it found cached, admitted after them) cannot run either,
        and the prefix cache forgets them all."""
        block_size = self.kv_cache_manager.block_size
        while True:
            unwritten = scheduler_output.written_blocks(failed, block_size)
            readers = scheduler_output.without(failed).requests_reading(unwritten)
            if not readers:
                break
            for reader in readers:
                self.failures.record(reader, "building the step", RuntimeError(
                    "the KV of its cached prefix was to be computed in this step by a request that failed"))
                failed.add(reader.request_id)
        self.kv_cache_manager.forget(unwritten)
        return scheduler_output.without(failed)

    def _fail_step(self, scheduler_output: Any, error: Exception, stage: str = "the model step") -> None:
        """A stage that works on the whole step failed: each of its requests fails with the error, and the
        prefix cache forgets the blocks the step was to write."""
        requests = scheduler_output.requests()
        logger.error("%s failed; its %d requests fail", stage, len(requests), exc_info=error)
        for request in requests:
            self.failures.record(request, stage, error, log=False)
        self.kv_cache_manager.forget(scheduler_output.written_blocks({r.request_id for r in requests},
                                                                     self.kv_cache_manager.block_size))

    def _finish_step(self, scheduler_output: Any, model_output: Any) -> list[RequestOutput]:
        outputs = []
        if model_output is not None:
            try:
                outputs = self.output_processor(scheduler_output, model_output)
            except Exception as e:  # noqa: BLE001 - a component that let a request's failure out: the step's fail
                self._fail_step(scheduler_output, e, stage="making the outputs")
        self.scheduler.free_finished(scheduler_output)
        self.stats_tracker.on_step(self.scheduler.get_stats())
        return outputs

    def _report_failures(self) -> list[RequestOutput]:
        """Every request that failed in this step: aborted (its KV blocks freed), and one output saying why."""
        failed = self.failures.take()
        for failure in failed:
            self.scheduler.abort_request(failure.request.request_id)
        return [self.output_processor.failed_output(failure) for failure in failed]

    def close(self) -> None:
        """Stop the executor's worker processes (also done when the engine is garbage-collected)."""
        self.executor.shutdown()

    def get_stats(self) -> EngineStats:
        """Running / waiting / preempted counts, KV-cache use, prefix hit rate, token totals and rates, and where
        the steps spent their time."""
        return self.stats_tracker.stats(self.scheduler.get_stats(), replace(self.step_times))
