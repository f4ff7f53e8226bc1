from wde.workflows.decoding.workflow import DecodingWorkflow


class GPT2Workflow(DecodingWorkflow):
    """GPT-2 generates as every decoder does: the whole decoding pipeline, reused slot for slot. GPT-2 keeps
    its own class so that a GPT-2-specific component can later replace one slot here without touching others."""
