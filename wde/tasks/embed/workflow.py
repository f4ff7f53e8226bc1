from wde.workflows.prefill_only.workflow import DecoderPrefillWorkflow, EncoderWorkflow


class EncoderEmbedWorkflow(EncoderWorkflow):
    """Sentence embeddings from BERT / XLM-RoBERTa, pooled as the model's sentence-transformers files say."""

    task = "embed"
    Pooler = "wde.tasks.embed.pooler:EmbeddingPooler"


class DecoderEmbedWorkflow(DecoderPrefillWorkflow):
    """Embeddings from decoders (gte-Qwen2, Qwen3-Embedding): the last token's hidden state, normalized."""

    task = "embed"
    Pooler = "wde.tasks.embed.pooler:EmbeddingPooler"
