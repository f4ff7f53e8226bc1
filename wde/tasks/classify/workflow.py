from wde.workflows.prefill_only.workflow import EncoderWorkflow


class EncoderClassifyWorkflow(EncoderWorkflow):
    """Class probabilities from an encoder with a sequence-classification head."""

    task = "classify"
    Pooler = "wde.tasks.classify.pooler:ClassificationPooler"
