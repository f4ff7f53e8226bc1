"""LLMEngine: builds a Workflow's components and drives them one step at a time, the same thin loop for every
workflow: its Stepper runs the step, then the engine reports each request that failed in it."""
import logging
import time
from dataclasses import replace
from typing import Any

from wde.core.config import EngineArgs, EngineConfig
from wde.core.dotted_path import import_object
from wde.core.engine.failures import RequestFailures
from wde.core.engine.pipeline import resolve_pipeline
from wde.core.engine.stats import EngineStats, StatsTracker
from wde.core.outputs import RequestOutput
from wde.core.plugins import load_plugins
from wde.core.registry import resolve_workflow, workflow_path
from wde.core.request import Request
from wde.core.workflow import Workflow, WorkflowError

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, workflow: type[Workflow], config: EngineConfig):
        start = time.perf_counter()
        self.workflow = workflow
        self.config = config
        # every slot imported, checked and chosen (backend, executor) before any weight is read
        self.components = resolve_pipeline(workflow, config)
        self.failures = RequestFailures()  # the one place a request's failure is recorded, until step() reports it
        self.stats_tracker = StatsTracker(log=not config.args.disable_log_stats)
        build = self._build
        self.tokenizer = build("Tokenizer")
        # a decoding workflow's grammar engine (structured outputs), used by the components built below
        self.structured_outputs = build("StructuredOutputs") if "StructuredOutputs" in self.components else None
        self.executor = build("Executor")  # loads the model and allocates the KV cache
        self.kv_cache_manager = build("KVCacheManager")
        self.request_processor = build("RequestProcessor")
        self.scheduler = build("Scheduler")
        self.input_processor = build("InputProcessor")
        self.model_pre_processor = build("ModelPreProcessor")
        self.output_processor = build("OutputProcessor")
        self.stepper = build("Stepper")
        logger.info("engine ready in %.1f s", time.perf_counter() - start)

    def _build(self, slot: str) -> Any:
        """The component of `slot`, built from this engine; a constructor a slot's class got wrong says which."""
        component = self.components[slot]
        try:
            return component.from_engine(self)
        except TypeError as e:
            raise TypeError(f"slot {slot!r} ({component.__module__}.{component.__qualname__}) of workflow "
                            f"{self.workflow.__qualname__} could not be built: {e}") from e

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs | None = None, **kwargs: Any) -> "LLMEngine":
        """An engine for the model's architecture, with the Workflow the registry names for it (or the one
        `workflow=` names, whose task `task="auto"` takes)."""
        start = time.perf_counter()
        load_plugins()
        args = engine_args.model_copy(update=kwargs) if engine_args else EngineArgs(**kwargs)
        args = EngineArgs.model_validate(args.model_dump())
        if args.data_parallel_size > 1:
            raise ValueError(f"data_parallel_size={args.data_parallel_size}: replicas run behind LLM("
                             "data_parallel_size=N) or `wde serve --data-parallel-size N`; one LLMEngine is one "
                             "replica")
        if args.workflow:
            workflow = import_workflow(workflow_path(args.workflow))
            if args.task == "auto":
                args = args.model_copy(update={"task": workflow.task})
            return cls.from_workflow(workflow, config=EngineConfig.from_args(args))
        config = EngineConfig.from_args(args)
        workflow = resolve_workflow(config.model.architecture, config.model.task)
        logger.info("plugins, engine arguments and model config read in %.1f s", time.perf_counter() - start)
        return cls(workflow, config)

    @classmethod
    def from_workflow(cls, workflow: type[Workflow] | str, config: EngineConfig | None = None,
                      **kwargs: Any) -> "LLMEngine":
        """An engine that runs `workflow` (a Workflow class or its "package.module:Name" path)."""
        load_plugins()
        workflow = import_workflow(workflow) if isinstance(workflow, str) else workflow
        if not (isinstance(workflow, type) and issubclass(workflow, Workflow)):
            raise TypeError(f"{workflow!r} is not a Workflow subclass")
        workflow.resolve()  # fail on a bad slot before reading the model
        if config is None:
            kwargs.setdefault("task", workflow.task)
            config = EngineConfig.from_args(EngineArgs(**kwargs))
        return cls(workflow, config)

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
        outputs = self.stepper.step()
        return outputs + self._report_failures()

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
        times = replace(self.stepper.times, host_copy_wait_s=self.executor.host_copy_wait_s())
        return self.stats_tracker.stats(self.scheduler.get_stats(), times)


def import_workflow(path: str) -> type[Workflow]:
    try:
        workflow = import_object(path)
    except Exception as e:  # noqa: BLE001 - whatever its module raises on import
        raise WorkflowError(f"workflow {path!r} cannot be imported: {type(e).__name__}: {e}") from e
    if not (isinstance(workflow, type) and issubclass(workflow, Workflow)):
        raise TypeError(f"{workflow!r} (workflow {path!r}) is not a Workflow subclass")
    return workflow
