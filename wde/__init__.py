"""wde: the Workflow Defined Engine."""
from wde.core.config import EngineArgs
from wde.core.engine.llm_engine import LLMEngine
from wde.core.outputs import (ClassificationOutput, CompletionOutput, EmbeddingOutput, PoolingRequestOutput,
                              RequestOutput, ScoringOutput)
from wde.core.pooling_params import PoolingParams
from wde.core.registry import register_attention_backend, register_model, register_workflow
from wde.core.sampling.sampling_params import RequestOutputKind, SamplingParams
from wde.core.workflow import Workflow
from wde.entrypoints.llm import LLM

__all__ = ["LLM", "LLMEngine", "EngineArgs", "SamplingParams", "PoolingParams", "RequestOutputKind",
           "RequestOutput", "CompletionOutput", "PoolingRequestOutput", "EmbeddingOutput", "ScoringOutput",
           "ClassificationOutput", "Workflow", "register_model", "register_workflow", "register_attention_backend"]
