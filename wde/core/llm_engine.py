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
                logger.exception("a model step failed; its %d requests fail", len(scheduler_output.scheduled))
                failed = self.scheduler.fail_scheduled(scheduler_output, f"{type(e).__name__}: {e}")
                return self.output_processor(failed, None)
            executed = time.perf_counter()
            times.schedule_s += scheduled - start
            times.execute_s += executed - scheduled
            times.num_steps += 1
            start = executed
        outputs = self.output_processor(scheduler_output, model_output)
        self.scheduler.free_finished(scheduler_output)
        self.stats_tracker.on_step(self.scheduler.get_stats())
        times.output_s += time.perf_counter() - start
        return outputs

    def close(self) -> None:
        """Stop the executor's worker processes (also done when the engine is garbage-collected)."""
        self.executor.shutdown()

    def get_stats(self) -> EngineStats:
        """Running / waiting / preempted counts, KV-cache use, prefix hit rate, token totals and rates, and where
        the steps spent their time."""
        return self.stats_tracker.stats(self.scheduler.get_stats(), replace(self.step_times))
