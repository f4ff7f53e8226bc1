"""Which model class and which Workflow serve each `architectures` name of a Hugging Face config.

Entries are dotted paths, resolved only when an engine starts for that architecture, so the registry never
imports a model it does not run.
"""
from dataclasses import dataclass

from wde.core.dotted_path import import_object

CHAT_WORKFLOW = "wde.tasks.chat.workflow:ChatWorkflow"


@dataclass(frozen=True)
class ModelEntry:
    model: str  # "package.module:ModelClass"
    workflow: str  # "package.module:WorkflowClass"


_MODELS: dict[str, ModelEntry] = {
    "LlamaForCausalLM": ModelEntry("wde.tasks.chat.models.llama:LlamaForCausalLM", CHAT_WORKFLOW),
    "Qwen2ForCausalLM": ModelEntry("wde.tasks.chat.models.qwen2:Qwen2ForCausalLM", CHAT_WORKFLOW),
    "Qwen3ForCausalLM": ModelEntry("wde.tasks.chat.models.qwen3:Qwen3ForCausalLM", CHAT_WORKFLOW),
}


def register_model(architecture: str, model: str, workflow: str, override: bool = False) -> None:
    """Serve `architecture` with the model class and Workflow at these dotted paths."""
    if architecture in _MODELS and not override:
        raise ValueError(f"architecture {architecture!r} is already registered "
                         f"({_MODELS[architecture].model}); pass override=True to replace it")
    _MODELS[architecture] = ModelEntry(model=model, workflow=workflow)


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_entry(architecture: str) -> ModelEntry:
    if architecture not in _MODELS:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(supported_architectures())}")
    return _MODELS[architecture]


def _resolve(architecture: str, what: str) -> type:
    path = getattr(get_model_entry(architecture), what)
    try:
        return import_object(path)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"the {what} registered for {architecture!r} ({path}) cannot be imported: {e}") from e


def resolve_model_class(architecture: str) -> type:
    return _resolve(architecture, "model")


def resolve_workflow(architecture: str) -> type:
    return _resolve(architecture, "workflow")
