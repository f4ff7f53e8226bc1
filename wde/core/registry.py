"""Which model class and which Workflow serve each `architectures` name of a Hugging Face config, per task.

A task is what the engine does with the model: "generate" (chat, completion), "embed" (a vector per input),
"score" (a relevance score per query / document pair) or "classify" (class probabilities per input). An
architecture's first registered task is its default. Entries are dotted paths, resolved only when an engine
starts, so the registry never imports a model it does not run.
"""
from dataclasses import dataclass

from wde.core.dotted_path import import_object

TASKS = ("generate", "embed", "score", "classify")
CHAT = "wde.tasks.chat.workflow:ChatWorkflow"
ENCODE = "wde.tasks.embed.workflow:EncoderEmbedWorkflow"
ENCODE_SCORE = "wde.tasks.rerank.workflow:CrossEncoderWorkflow"
ENCODE_CLASSIFY = "wde.tasks.classify.workflow:EncoderClassifyWorkflow"
DECODER_EMBED = "wde.tasks.embed.workflow:DecoderEmbedWorkflow"
DECODER_SCORE = "wde.tasks.rerank.workflow:DecoderRerankWorkflow"


@dataclass(frozen=True)
class ModelEntry:
    model: str  # "package.module:ModelClass"
    workflow: str  # "package.module:WorkflowClass"


def _decoder(model: str) -> dict[str, ModelEntry]:
    return {"generate": ModelEntry(model, CHAT), "embed": ModelEntry(model, DECODER_EMBED),
            "score": ModelEntry(model, DECODER_SCORE)}


_MODELS: dict[str, dict[str, ModelEntry]] = {
    "LlamaForCausalLM": _decoder("wde.models.llama:LlamaForCausalLM"),
    "Qwen2ForCausalLM": _decoder("wde.models.qwen2:Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": _decoder("wde.models.qwen3:Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": _decoder("wde.models.qwen3_moe:Qwen3MoeForCausalLM"),
    "Qwen2MoeForCausalLM": _decoder("wde.models.qwen2_moe:Qwen2MoeForCausalLM"),
    "MixtralForCausalLM": _decoder("wde.models.mixtral:MixtralForCausalLM"),
    "MistralForCausalLM": _decoder("wde.models.mistral:MistralForCausalLM"),
    "Phi3ForCausalLM": _decoder("wde.models.phi3:Phi3ForCausalLM"),
    "Gemma2ForCausalLM": _decoder("wde.models.gemma2:Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": _decoder("wde.models.gemma2:Gemma3ForCausalLM"),
    # decoders saved without their LM head (gte-Qwen2, Qwen3-Embedding): last-token embedders
    "Qwen2Model": {"embed": ModelEntry("wde.models.qwen2:Qwen2ForCausalLM", DECODER_EMBED)},
    "Qwen3Model": {"embed": ModelEntry("wde.models.qwen3:Qwen3ForCausalLM", DECODER_EMBED)},
    "BertModel": {"embed": ModelEntry("wde.models.bert:BertModel", ENCODE)},
    "Gemma3TextModel": {"embed": ModelEntry("wde.models.gemma2:Gemma3TextEncoder", ENCODE)},  # EmbeddingGemma
    "XLMRobertaModel": {"embed": ModelEntry("wde.models.xlm_roberta:XLMRobertaModel", ENCODE)},
    "BertForSequenceClassification": {
        "score": ModelEntry("wde.models.bert:BertForSequenceClassification", ENCODE_SCORE),
        "classify": ModelEntry("wde.models.bert:BertForSequenceClassification", ENCODE_CLASSIFY)},
    "XLMRobertaForSequenceClassification": {
        "score": ModelEntry("wde.models.xlm_roberta:XLMRobertaForSequenceClassification",
                            ENCODE_SCORE),
        "classify": ModelEntry("wde.models.xlm_roberta:XLMRobertaForSequenceClassification",
                               ENCODE_CLASSIFY)},
}


def register_model(architecture: str, model: str, workflow: str, task: str = "generate",
                   override: bool = False) -> None:
    """Serve `architecture` for `task` with the model class and Workflow at these dotted paths."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if task in _MODELS.get(architecture, {}) and not override:
        raise ValueError(f"architecture {architecture!r} is already registered for {task!r} "
                         f"({_MODELS[architecture][task].model}); pass override=True to replace it")
    _MODELS.setdefault(architecture, {})[task] = ModelEntry(model=model, workflow=workflow)


_WORKFLOWS: dict[str, str] = {}  # name -> "package.module:Workflow", for EngineArgs(workflow=name)
_ATTENTION_BACKENDS: dict[str, str] = {
    "torch": "wde.core.attention.torch_backend:TorchAttentionBackend",
    "triton": "wde.core.attention.triton_backend:TritonAttentionBackend",
    "flash_attn": "wde.core.attention.flash_attn_backend:FlashAttnBackend",
    "encoder_torch": "wde.core.attention.encoder_backends:EncoderTorchBackend",
    "encoder_flash": "wde.core.attention.encoder_backends:EncoderFlashBackend",
}


def register_workflow(name: str, workflow: str, override: bool = False) -> None:
    """Make a Workflow selectable by name: LLM(model=..., workflow=name)."""
    if name in _WORKFLOWS and not override:
        raise ValueError(f"workflow {name!r} is already registered ({_WORKFLOWS[name]}); pass override=True")
    _WORKFLOWS[name] = workflow


def register_attention_backend(name: str, backend: str, override: bool = False) -> None:
    """Make an AttentionBackend selectable by name: LLM(model=..., attention_backend=name)."""
    if name in _ATTENTION_BACKENDS and not override:
        raise ValueError(f"attention backend {name!r} is already registered ({_ATTENTION_BACKENDS[name]}); "
                         "pass override=True")
    _ATTENTION_BACKENDS[name] = backend


def attention_backends() -> dict[str, str]:
    return dict(_ATTENTION_BACKENDS)


def workflow_path(name: str) -> str:
    """A registered workflow's dotted path; a dotted path is taken as it is."""
    if name in _WORKFLOWS:
        return _WORKFLOWS[name]
    if ":" in name:
        return name
    known = ", ".join(sorted(_WORKFLOWS)) or "none registered"
    raise ValueError(f"unknown workflow {name!r} (give a registered name or 'package.module:Workflow'); "
                     f"registered: {known}")


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def tasks_of(architecture: str) -> list[str]:
    return list(_entries(architecture))


def _entries(architecture: str) -> dict[str, ModelEntry]:
    if architecture not in _MODELS:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(supported_architectures())}")
    return _MODELS[architecture]


def get_model_entry(architecture: str, task: str = "auto") -> ModelEntry:
    entries = _entries(architecture)
    if task == "auto":
        return next(iter(entries.values()))
    if task not in entries:
        raise ValueError(f"architecture {architecture!r} cannot {task}; it can: {', '.join(entries)}")
    return entries[task]


def _resolve(architecture: str, task: str, what: str) -> type:
    path = getattr(get_model_entry(architecture, task), what)
    try:
        return import_object(path)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"the {what} registered for {architecture!r} ({path}) cannot be imported: {e}") from e


def resolve_model_class(architecture: str, task: str = "auto") -> type:
    return _resolve(architecture, task, "model")


def resolve_workflow(architecture: str, task: str = "auto") -> type:
    return _resolve(architecture, task, "workflow")
