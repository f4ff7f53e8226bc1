"""Which attention backend an engine runs: the `attention_backend` engine argument, by name, or "auto"."""
import logging

from wde.core.config import EngineConfig
from wde.core.dotted_path import import_object
from wde.core.registry import attention_backends

logger = logging.getLogger(__name__)

# "auto" on a GPU: the first of these that can run and computes the workflow's kind of attention ("paged" for
# decoders, "encoder" for encoders); on a CPU: the workflow's own AttentionBackend slot
GPU_PREFERENCE = ("flash_attn", "triton", "encoder_flash")


def select_attention_backend(config: EngineConfig, workflow_backend: type) -> type:
    name, known = config.args.attention_backend, attention_backends()
    if name != "auto":
        if name not in known:
            raise ValueError(f"unknown attention_backend {name!r}; known: auto, {', '.join(known)}")
        backend = import_object(known[name])
        if getattr(backend, "kind", None) != getattr(workflow_backend, "kind", None):
            raise ValueError(f"attention_backend {name!r} computes {backend.kind} attention; this workflow needs "
                             f"{getattr(workflow_backend, 'kind', '?')} attention")
        reason = unavailable(backend, config)
        if reason:
            raise ValueError(f"attention_backend {name!r} cannot run here: {reason}")
        logger.info("attention backend: %s (asked for)", name)
        return backend
    if config.device.type == "cuda":
        skipped = []
        for candidate in GPU_PREFERENCE:
            backend = import_object(known[candidate])
            if getattr(backend, "kind", None) != getattr(workflow_backend, "kind", None):
                continue  # another kind of attention: not a candidate
            reason = unavailable(backend, config)
            if reason is None:
                logger.info("attention backend: %s (auto; %s)", candidate,
                            "; ".join(skipped) or "the first choice")
                return backend
            skipped.append(f"not {candidate}: {reason}")
    logger.info("attention backend: %s (auto: the workflow's)", workflow_backend.__name__)
    return workflow_backend


def unavailable(backend: type, config: EngineConfig) -> str | None:
    check = getattr(backend, "is_available", None)
    return check(config) if check else None
