"""Per-step data that every attention layer reads, set around one forward pass.

Models keep the signature forward(input_ids, positions): the attention metadata reaches the attention layers
through this context instead of being threaded through every module (which also keeps CUDA-graph capture
simple: the graph sees fixed tensors, not arguments).

The context belongs to the thread that set it: a server runs each of its engines (a chat model and an
embedding model, say) in a thread of its own, and one engine's step must never read another's metadata.
"""
import threading
from contextlib import contextmanager
from typing import Any, Iterator

_local = threading.local()


@contextmanager
def set_forward_context(attn_metadata: Any) -> Iterator[None]:
    previous = getattr(_local, "attn_metadata", None)
    _local.attn_metadata = attn_metadata
    try:
        yield
    finally:
        _local.attn_metadata = previous


def get_attn_metadata() -> Any:
    metadata = getattr(_local, "attn_metadata", None)
    if metadata is None:
        raise RuntimeError("an attention layer ran outside set_forward_context()")
    return metadata
