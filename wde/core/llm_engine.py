"""LLMEngine: builds a Workflow's components and drives them one step at a time."""
import logging
import time
from dataclasses import replace
from typing import Any

from wde.core.attention.selector import select_attention_backend
from wde.core.config import EngineArgs, EngineConfig
from wde.core.dotted_path import import_object
from wde.core.multiproc_executor import ExecutorDeadError
from wde.core.outputs import RequestOutput
from wde.core.plugins import load_plugins
from wde.core.registry import resolve_model_class, resolve_workflow, workflow_path
from wde.core.stats import EngineStats, StatsTracker, StepTimes
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
        """Queue a request; raises ValueError / TypeError at once for a bad prompt or params."""
        request = self.input_processor(str(request_id), prompt, params, time.time())
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request in whatever state it is and free its KV blocks; False if it was not found."""
        return self.scheduler.abort_request(str(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        if self.async_scheduling:
            return self._step_overlapped()
        times = self.step_times
        start = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        model_output = None
        if scheduler_output.scheduled:
            model_input = self.model_pre_processor(scheduler_output)
            scheduled = time.perf_counter()
            try:
                model_output = self.executor.execute_model(model_input)
            except ExecutorDeadError:
                raise  # a lost tensor-parallel rank: no step can run any more
            except Exception as e:  # the step's requests fail with the error; the others keep being served
                return self._fail_step(scheduler_output, e)
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
            outputs += self._finish_in_flight(previous, self._collect(previous, outputs))
            previous = None
            # what that step stopped has no blocks any more: it leaves this step
            scheduler_output.scheduled = [s for s in scheduler_output.scheduled if not s.seq.is_finished]
        if not scheduler_output.scheduled:
            return outputs + self._finish_step(scheduler_output, None)
        model_input = self.model_pre_processor(scheduler_output)
        scheduled = time.perf_counter()
        try:
            self.in_flight = (scheduler_output, self.executor.launch(model_input))
        except ExecutorDeadError:
            raise
        except Exception as e:
            outputs += self._fail_step(scheduler_output, e)
        sampled = self._collect(previous, outputs) if previous is not None else None
        collected = time.perf_counter()
        times.schedule_s += scheduled - start
        times.execute_s += collected - scheduled
        times.num_steps += 1
        outputs += self._finish_in_flight(previous, sampled)
        times.output_s += time.perf_counter() - collected
        return outputs

    def _collect(self, in_flight: tuple[Any, Any], outputs: list[RequestOutput]) -> Any:
        """The launched step's sampled tokens, or None with its requests failed into `outputs`."""
        try:
            return in_flight[1].result()
        except ExecutorDeadError:
            raise
        except Exception as e:
            outputs += self._fail_step(in_flight[0], e)
            return None

    def _finish_in_flight(self, in_flight: tuple[Any, Any] | None, sampled: Any) -> list[RequestOutput]:
        """Outputs of a launched step whose tokens arrived (none for a step that failed: its requests did)."""
        return [] if in_flight is None or sampled is None else self._finish_step(in_flight[0], sampled)

    def _fail_step(self, scheduler_output: Any, error: Exception) -> list[RequestOutput]:
        """The step's requests fail with the error; the others keep being served."""
        logger.exception("a model step failed; its %d requests fail", len(scheduler_output.scheduled),
                         exc_info=error)
        failed = self.scheduler.fail_scheduled(scheduler_output, f"{type(error).__name__}: {error}")
        return self.output_processor(failed, None)

    def _finish_step(self, scheduler_output: Any, model_output: Any) -> list[RequestOutput]:
        outputs = self.output_processor(scheduler_output, model_output)
        self.scheduler.free_finished(scheduler_output)
        self.stats_tracker.on_step(self.scheduler.get_stats())
        return outputs

    def close(self) -> None:
        """Stop the executor's worker processes (also done when the engine is garbage-collected)."""
        self.executor.shutdown()

    def get_stats(self) -> EngineStats:
        """Running / waiting / preempted counts, KV-cache use, prefix hit rate, token totals and rates, and where
        the steps spent their time."""
        return self.stats_tracker.stats(self.scheduler.get_stats(), replace(self.step_times))
