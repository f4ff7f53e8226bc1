"""Which attention backend an engine runs: the `attention_backend` engine argument, by name, or "auto".

"auto" runs the Workflow's AttentionBackend slot, except where the slot is one of the portable torch
references the workflow families name: on a GPU the first faster backend of the same kind that can run
replaces it. A Workflow that names a backend of its own always gets it.
"""
import logging

from wde.core.config import EngineConfig
from wde.core.dotted_path import import_object
from wde.core.interfaces import AttentionBackend
from wde.core.registry import attention_backends
from wde.core.workflow import import_component

logger = logging.getLogger(__name__)

# "auto" on a GPU: the first of these that can run and computes the workflow's kind of attention ("paged" for
# decoders, "encoder" for encoders); on a CPU: the workflow's own AttentionBackend slot
GPU_PREFERENCE = ("flash_attn", "triton", "encoder_flash")
PORTABLE_REFERENCES = ("torch", "encoder_torch")


def select_attention_backend(config: EngineConfig, workflow_backend: type) -> type:
    name, known = config.args.attention_backend, attention_backends()
    if name != "auto":
        if name not in known:
            raise ValueError(f"unknown attention_backend {name!r}; known: auto, {', '.join(known)}")
        backend, problem = import_component(known[name], AttentionBackend)
        if problem:
            raise ValueError(f"attention_backend {name!r} = {known[name]!r} cannot be used: {problem}")
        if backend.kind != workflow_backend.kind:
            raise ValueError(f"attention_backend {name!r} computes {backend.kind} attention; this workflow needs "
                             f"{workflow_backend.kind} attention")
        reason = backend.is_available(config)
        if reason:
            raise ValueError(f"attention_backend {name!r} cannot run here: {reason}")
        logger.info("attention backend: %s (asked for)", name)
        return backend
    portable = workflow_backend in {import_object(known[name]) for name in PORTABLE_REFERENCES}
    if config.device.type == "cuda" and portable:
        skipped = []
        for candidate in GPU_PREFERENCE:
            backend = import_object(known[candidate])
            if backend.kind != workflow_backend.kind:
                continue  # another kind of attention: not a candidate
            reason = backend.is_available(config)
            if reason is None:
                logger.info("attention backend: %s (auto; %s)", candidate,
                            "; ".join(skipped) or "the first choice")
                return backend
            skipped.append(f"not {candidate}: {reason}")
    logger.info("attention backend: %s (auto: the workflow's%s)", workflow_backend.__name__,
                "" if portable else ", its own choice")
    return workflow_backend

