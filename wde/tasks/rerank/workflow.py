from wde.workflows.prefill_only.workflow import DecoderPrefillWorkflow, EncoderWorkflow


class CrossEncoderWorkflow(EncoderWorkflow):
    """Rerankers that read "query [SEP] document" through an encoder with a classification head."""

    task = "score"
    Pooler = "wde.tasks.rerank.pooler:CrossEncoderPooler"


class DecoderRerankWorkflow(DecoderPrefillWorkflow):
    """Rerankers that read query then document through a decoder and answer yes or no (Qwen3-Reranker)."""

    task = "score"
    Pooler = "wde.tasks.rerank.pooler:YesNoPooler"
