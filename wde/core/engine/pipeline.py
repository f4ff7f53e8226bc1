"""The pipeline an engine runs: every slot of its Workflow resolved to the class that will run, with the
decisions the config takes part in (the attention backend, the executor, async scheduling), made here once,
checked, and logged at start. `config.args.async_scheduling` leaves here a bool."""
import logging

from wde.core.attention.selector import select_attention_backend
from wde.core.config import EngineConfig
from wde.core.engine.executor import LocalExecutor
from wde.core.registry import resolve_model_class
from wde.core.workflow import Workflow

logger = logging.getLogger(__name__)


def resolve_pipeline(workflow: type[Workflow], config: EngineConfig) -> dict[str, type]:
    """Slot name -> the class that runs it; raises (before any weight is read) for a combination that cannot
    run. The worker processes of tensor parallelism are given this same mapping."""
    components = workflow.resolve()
    if workflow.task != config.model.task:
        raise ValueError(f"workflow {workflow.__qualname__} does {workflow.task!r}, but the engine was asked to "
                         f"{config.model.task!r}; pass task={workflow.task!r}")
    model_class = resolve_model_class(config.model.architecture, config.model.task)
    components["AttentionBackend"] = select_attention_backend(config, components["AttentionBackend"])
    components["Executor"] = choose_executor(config, components["Executor"])
    config.args = config.args.model_copy(update={"async_scheduling": choose_async_scheduling(
        config, components["Stepper"], workflow)})
    logger.info("pipeline of %s for %s (%s, %s) on %s, task %s, async scheduling %s:\n  %s",
                workflow.__qualname__, config.model.architecture, model_class.__name__,
                "decoder" if workflow.causal else "encoder", config.device, config.model.task,
                "on" if config.args.async_scheduling else "off",
                "\n  ".join(f"{slot:<17} {cls.__module__}.{cls.__qualname__}" for slot, cls in components.items()))
    return components


def choose_async_scheduling(config: EngineConfig, stepper: type, workflow: type[Workflow]) -> bool:
    """On unless turned off, where the Stepper can launch a step before the last one's outputs are made."""
    asked = config.args.async_scheduling
    if asked and not stepper.overlaps_steps:
        logger.info("async scheduling off: %s has no step whose input depends on the last one's output",
                    workflow.__qualname__)
    return stepper.overlaps_steps and asked is not False


def choose_executor(config: EngineConfig, executor: type) -> type:
    """The Executor slot, except that the default one runs on several processes when tensor_parallel_size > 1
    (MultiprocExecutor); another Executor must say it can (`supports_tensor_parallel`)."""
    world_size = config.args.tensor_parallel_size
    if world_size == 1:
        return executor
    if executor is LocalExecutor:
        from wde.core.parallel.multiproc_executor import MultiprocExecutor
        return MultiprocExecutor
    if not executor.supports_tensor_parallel:
        raise ValueError(f"the workflow's Executor slot ({executor.__module__}.{executor.__qualname__}) cannot run "
                         f"tensor_parallel_size={world_size}: an executor that can says supports_tensor_parallel = "
                         "True")
    return executor
