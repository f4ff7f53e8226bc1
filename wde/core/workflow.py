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
from typing import ClassVar

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
            try:
                obj = import_object(path)
            except (ImportError, AttributeError, ValueError) as e:
                problems.append(f"slot {slot!r} = {path!r}: {type(e).__name__}: {e}")
                continue
            if not (isinstance(obj, type) and issubclass(obj, kind)):
                problems.append(f"slot {slot!r} = {path!r}: {obj!r} is not a subclass of "
                                f"{kind.__module__}.{kind.__qualname__}")
                continue
            if inspect.isabstract(obj):
                missing = ", ".join(sorted(obj.__abstractmethods__))
                problems.append(f"slot {slot!r} = {path!r}: {obj.__qualname__} does not implement {missing}")
                continue
            components[slot] = obj
        backend = components.get("AttentionBackend")
        needed = "paged" if cls.causal else "encoder"
        if backend is not None and getattr(backend, "kind", None) != needed:
            problems.append(f"slot 'AttentionBackend' = {cls.AttentionBackend!r}: it computes "
                            f"{getattr(backend, 'kind', None)!r} attention; a workflow with causal={cls.causal} "
                            f"needs {needed!r}")
        if problems:
            raise WorkflowError(f"workflow {cls.__module__}.{cls.__qualname__} has bad slots:\n  "
                                + "\n  ".join(problems))
        return components
