"""Per-step data that every attention layer reads, set around one forward pass.

Models keep the signature forward(input_ids, positions): the attention metadata reaches the attention layers
through this context instead of being threaded through every module (which also keeps CUDA-graph capture
simple: the graph sees fixed tensors, not arguments).
"""
from contextlib import contextmanager
from typing import Any, Iterator

_attn_metadata: Any = None


@contextmanager
def set_forward_context(attn_metadata: Any) -> Iterator[None]:
    global _attn_metadata
    previous, _attn_metadata = _attn_metadata, attn_metadata
    try:
        yield
    finally:
        _attn_metadata = previous


def get_attn_metadata() -> Any:
    if _attn_metadata is None:
        raise RuntimeError("an attention layer ran outside set_forward_context()")
    return _attn_metadata
