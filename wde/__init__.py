"""wde: the Workflow Defined Engine."""
from wde.core.config import EngineArgs
from wde.core.llm_engine import LLMEngine
from wde.core.outputs import CompletionOutput, RequestOutput
from wde.core.sampling_params import RequestOutputKind, SamplingParams
from wde.core.workflow import Workflow
from wde.entrypoints.llm import LLM

__all__ = ["LLM", "LLMEngine", "EngineArgs", "SamplingParams", "RequestOutputKind", "RequestOutput",
           "CompletionOutput", "Workflow"]
