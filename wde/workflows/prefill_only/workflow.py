from typing import ClassVar

from wde.core import interfaces
from wde.core.workflow import Workflow


class PrefillOnlyWorkflow(Workflow):
    """One forward pass per input, never a decoding step: embeddings, scores, classes.

    add_request -> PrefillOnlyInputProcessor (checks the input or (query, document) pair and PoolingParams)
    step (OverlappedStepper: with async_scheduling, the default, step k+1 is built and launched before step k's
          results are read):
           PrefillOnlyScheduler (packs whole inputs by token budget; tokenizes them through
           PrefillOnlyRequestProcessor only now; decoders: KV blocks and prefix hits from KVCacheManager)
        -> PrefillOnlyModelPreProcessor (one flat unpadded batch, cu_seqlens / paged metadata)
        -> LocalExecutor -> PrefillOnlyWorker (model forward with the AttentionBackend, then the Pooler)
        -> PrefillOnlyOutputProcessor (one finished output per input)
    Subclasses set the task, the Pooler, and whether the model is an encoder or a decoder.
    """

    SLOT_KINDS: ClassVar[dict[str, type]] = {**Workflow.SLOT_KINDS, "Pooler": interfaces.Pooler}

    InputProcessor = "wde.workflows.prefill_only.input_processor:PrefillOnlyInputProcessor"
    RequestProcessor = "wde.workflows.prefill_only.request_processor:PrefillOnlyRequestProcessor"
    KVCacheManager = "wde.core.kv_cache.kv_cache_manager:KVCacheManager"  # encoders: with no blocks
    Scheduler = "wde.workflows.prefill_only.scheduler:PrefillOnlyScheduler"
    ModelPreProcessor = "wde.workflows.prefill_only.model_pre_processor:PrefillOnlyModelPreProcessor"
    Worker = "wde.workflows.prefill_only.worker:PrefillOnlyWorker"
    OutputProcessor = "wde.workflows.prefill_only.output_processor:PrefillOnlyOutputProcessor"
    Stepper = "wde.core.engine.stepping:OverlappedStepper"  # the host builds a step while the last one runs
    Pooler: ClassVar[str]


class EncoderWorkflow(PrefillOnlyWorkflow):
    """BERT-like encoders: bidirectional attention within each input, no KV cache."""

    causal = False  # so its KV cache has no blocks
    AttentionBackend = "wde.core.attention.encoder_backends:EncoderTorchBackend"


class DecoderPrefillWorkflow(PrefillOnlyWorkflow):
    """Decoders used for one pass: causal attention over the paged KV cache, so with enable_prefix_caching an
    instruction or query shared by many inputs is computed once."""

    causal = True
    AttentionBackend = "wde.core.attention.torch_backend:TorchAttentionBackend"
