"""Workflow: a declarative list of the components that make up one model type's pipeline.

    LLMEngine.add_request(request_id, prompt, params)
      -> InputProcessor      validates and wraps the input (no tokenization)
      -> Scheduler           queues the Request
    LLMEngine.step()     the Stepper runs one step:
      -> RequestProcessor    lazily, at schedule time: tokenize, truncate, build the sequence state
      -> Scheduler           picks what runs this step (KVCacheManager hands out KV blocks)
      -> ModelPreProcessor   scheduler output -> flat tensors
      -> Executor / Worker   runs the model (AttentionBackend computes attention)
      -> OutputProcessor     results -> RequestOutput
    then the engine reports every request that failed in the step (its blocks freed)

Each slot holds a "package.module:Name" path. Nothing is imported when a Workflow class is defined or
imported; `Workflow.resolve()` imports every slot when an engine starts and checks each against the kind of
component its slot requires (a subclass of it that implements every abstract method), and that the attention
backend computes the workflow's kind of attention, so a bad path fails at start with one error naming the
workflow, slot and path. A subclass overrides any slot by assigning a new path.

`causal` is the one place that says decoder or encoder: the attention backend's `kind` must agree with it
(checked here), and the rest follows from it (an encoder's KV cache has no blocks).
"""
import inspect
import typing
from typing import Any, ClassVar

from wde.core import interfaces
from wde.core.dotted_path import import_object


class WorkflowError(ValueError):
    """A Workflow slot names something that cannot be imported or is not the right kind of component."""


class Workflow:
    # slot name -> the kind of component it must name
    SLOT_KINDS: ClassVar[dict[str, type]] = {
        "Tokenizer": interfaces.Tokenizer,
        "InputProcessor": interfaces.InputProcessor,
        "RequestProcessor": interfaces.RequestProcessor,
        "KVCacheManager": interfaces.KVCacheManager,
        "Scheduler": interfaces.Scheduler,
        "ModelPreProcessor": interfaces.ModelPreProcessor,
        "Executor": interfaces.Executor,
        "Worker": interfaces.Worker,
        "OutputProcessor": interfaces.OutputProcessor,
        "AttentionBackend": interfaces.AttentionBackend,
        "Stepper": interfaces.Stepper,
    }

    task: ClassVar[str] = "generate"  # what its engines do: generate, embed, score or classify
    causal: ClassVar[bool] = True  # a decoder (causal attention over a KV cache) rather than an encoder

    Tokenizer: ClassVar[str] = "wde.core.tokenizer:HFTokenizer"
    Executor: ClassVar[str] = "wde.core.engine.executor:LocalExecutor"
    Stepper: ClassVar[str] = "wde.core.engine.stepping:SyncStepper"
    KVCacheManager: ClassVar[str] = "wde.core.kv_cache.kv_cache_manager:KVCacheManager"
    InputProcessor: ClassVar[str]
    RequestProcessor: ClassVar[str]
    Scheduler: ClassVar[str]
    ModelPreProcessor: ClassVar[str]
    Worker: ClassVar[str]
    OutputProcessor: ClassVar[str]
    AttentionBackend: ClassVar[str]

    @classmethod
    def resolve(cls) -> dict[str, type]:
        """Import every slot and check its kind; raise one WorkflowError listing every bad slot."""
        components, problems = {}, []
        for slot, kind in cls.SLOT_KINDS.items():
            path = getattr(cls, slot, None)
            if path is None:
                problems.append(f"slot {slot!r} is not set")
                continue
            component, problem = import_component(path, kind)
            if problem:
                problems.append(f"slot {slot!r} = {path!r}: {problem}")
                continue
            components[slot] = component
        problems += cls._disagreements(components)
        if problems:
            raise WorkflowError(f"workflow {cls.__module__}.{cls.__qualname__} has bad slots:\n  "
                                + "\n  ".join(problems))
        return components

    @classmethod
    def _disagreements(cls, components: dict[str, type]) -> list[str]:
        """Slots that cannot work together: an attention backend of the other kind than `causal`, or a step's
        scheduler output that a consumer does not take (a component from another workflow family)."""
        problems = []
        backend = components.get("AttentionBackend")
        needed = "paged" if cls.causal else "encoder"
        if backend is not None and backend.kind != needed:
            problems.append(f"slot 'AttentionBackend' = {cls.AttentionBackend!r}: it computes {backend.kind!r} "
                            f"attention; a workflow with causal={cls.causal} needs {needed!r}")
        given = contract_arguments(components.get("Scheduler"), interfaces.Scheduler)
        for consumer in ("ModelPreProcessor", "OutputProcessor"):
            taken = contract_arguments(components.get(consumer), cls.SLOT_KINDS[consumer])
            if given and taken and not issubclass(given[0], taken[0]):
                problems.append(f"slot {consumer!r} = {getattr(cls, consumer)!r} takes a {taken[0].__qualname__} "
                                f"({taken[0].__module__}), but the Scheduler gives a {given[0].__qualname__} "
                                f"({given[0].__module__}): they are of different workflow families")
        return problems


def import_component(path: Any, kind: type) -> tuple[type | None, str | None]:
    """(the class `path` names, None), or (None, why it cannot serve as a `kind`): not a "package.module:Name"
    string, an import that fails in any way, not a class of that kind, or abstract methods left."""
    if not isinstance(path, str):
        return None, f"a slot holds a 'package.module:Name' string, not {type(path).__name__} {path!r}"
    try:
        obj = import_object(path)
    except Exception as e:  # noqa: BLE001 - whatever the module raises on import (a SyntaxError too)
        return None, f"{type(e).__name__}: {e}"
    if not (isinstance(obj, type) and issubclass(obj, kind)):
        return None, f"{obj!r} is not a subclass of {kind.__module__}.{kind.__qualname__}"
    if inspect.isabstract(obj):
        return None, f"{obj.__qualname__} does not implement {', '.join(sorted(obj.__abstractmethods__))}"
    return obj, None


def contract_arguments(component: type | None, contract: type) -> tuple[type, ...]:
    """What `component` binds a generic contract's type variables to (DecodingScheduler -> (SchedulerOutput,));
    () when it binds none."""
    for klass in component.__mro__ if component is not None else ():
        for base in getattr(klass, "__orig_bases__", ()):
            origin = typing.get_origin(base)
            arguments = typing.get_args(base)
            # the first is the one checked (the step's scheduler output); a type variable is not bound yet
            if isinstance(origin, type) and issubclass(origin, contract) and arguments \
                    and isinstance(arguments[0], type) and not isinstance(arguments[0], typing.TypeVar):
                return arguments
    return ()
