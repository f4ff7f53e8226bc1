from wde.workflows.decoding.workflow import DecodingWorkflow


class ChatWorkflow(DecodingWorkflow):
    """Chat and text generation (Llama, Qwen2, Qwen3, and plugin decoders such as GPT-2): the decoding pipeline
    as DecodingWorkflow lists it.

    Why a class of its own with no slot of its own: it is the public name of the "generate" task's pipeline,
    the one the registry serves and plugins subclass (wde-shortest-first replaces its Scheduler), while
    DecodingWorkflow is the family's base that other decoding tasks build on. A change to how chat generates
    (a chat-specific component) goes here without touching the family.
    """
