from wde.workflows.decoding.workflow import DecodingWorkflow


class ChatWorkflow(DecodingWorkflow):
    """Chat and text generation (Llama, Qwen2, Qwen3): the decoding pipeline as DecodingWorkflow lists it."""
