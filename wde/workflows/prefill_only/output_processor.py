"""Pooled results -> one finished PoolingRequestOutput per input (an embedding, a score or class probabilities)."""
import torch

from wde.core import interfaces
from wde.core.outputs import ClassificationOutput, EmbeddingOutput, PoolingRequestOutput, ScoringOutput
from wde.workflows.prefill_only.scheduler import PrefillOnlySchedulerOutput

WRAP = {"embed": EmbeddingOutput, "classify": ClassificationOutput,
        "score": lambda value: ScoringOutput(float(value))}


class PrefillOnlyOutputProcessor(interfaces.OutputProcessor):
    @classmethod
    def from_engine(cls, engine) -> "PrefillOnlyOutputProcessor":
        return cls(engine.config, engine.workflow.task)

    def __init__(self, config, task: str):
        super().__init__(config)
        self.wrap = WRAP[task]

    def __call__(self, scheduler_output: PrefillOnlySchedulerOutput, results: list[torch.Tensor] | None
                 ) -> list[PoolingRequestOutput]:
        outputs = [PoolingRequestOutput(request.request_id, None, request.prompt_token_ids or [], error=error)
                   for request, error in scheduler_output.failed]
        for item, result in zip(scheduler_output.scheduled, results or []):
            seq = item.seq
            outputs.append(PoolingRequestOutput(seq.request_id, self.wrap(result), seq.prompt_token_ids,
                                                num_cached_tokens=item.num_cached_tokens))
        return outputs
