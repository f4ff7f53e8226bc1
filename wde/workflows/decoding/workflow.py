from typing import ClassVar

from wde.core import interfaces
from wde.core.workflow import Workflow


class DecodingWorkflow(Workflow):
    """Autoregressive generation with continuous batching over a paged KV cache.

    add_request -> DecodingInputProcessor (checks the prompt and SamplingParams; starts compiling a
                   structured output's grammar through XGrammarBackend)
    step (DecodingStepper: each step to its end, or with async_scheduling the next one launched first):
           DecodingScheduler (admits, prefills in chunks, decodes; tokenizes new requests through
           DecodingRequestProcessor; KV blocks from KVCacheManager)
        -> DecodingModelPreProcessor (one flat batch + paged-attention metadata)
        -> LocalExecutor -> DecodingWorker (model forward with the AttentionBackend, then Sampler)
        -> DecodingOutputProcessor (append tokens, stop checks, incremental text, RequestOutputs)
    A structured output's sequences each hold a matcher (from the RequestProcessor): the ModelPreProcessor
    takes the step's token mask from StructuredOutputs, the Sampler applies it, the OutputProcessor advances
    the matchers.
    """

    SLOT_KINDS: ClassVar[dict[str, type]] = {**Workflow.SLOT_KINDS,
                                             "StructuredOutputs": interfaces.StructuredOutputBackend}

    task = "generate"
    Tokenizer = "wde.core.tokenizer:HFTokenizer"
    InputProcessor = "wde.workflows.decoding.input_processor:DecodingInputProcessor"
    RequestProcessor = "wde.workflows.decoding.request_processor:DecodingRequestProcessor"
    KVCacheManager = "wde.core.kv_cache.kv_cache_manager:KVCacheManager"
    Scheduler = "wde.workflows.decoding.scheduler:DecodingScheduler"
    ModelPreProcessor = "wde.workflows.decoding.model_pre_processor:DecodingModelPreProcessor"
    Executor = "wde.core.engine.executor:LocalExecutor"
    Worker = "wde.workflows.decoding.worker:DecodingWorker"
    OutputProcessor = "wde.workflows.decoding.output_processor:DecodingOutputProcessor"
    AttentionBackend = "wde.core.attention.torch_backend:TorchAttentionBackend"
    StructuredOutputs = "wde.workflows.decoding.structured_outputs:XGrammarBackend"
    Stepper = "wde.workflows.decoding.stepping:DecodingStepper"  # synchronous, or overlapped (async_scheduling)
