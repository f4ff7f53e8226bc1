"""Pooled results -> one finished PoolingRequestOutput per input (an embedding, a score or class probabilities)."""
import torch

from wde.core import interfaces
from wde.core.engine.failures import Failure, RequestFailures
from wde.core.outputs import ClassificationOutput, EmbeddingOutput, PoolingRequestOutput, ScoringOutput
from wde.workflows.prefill_only.scheduler import PrefillOnlySchedulerOutput

WRAP = {"embed": EmbeddingOutput, "classify": ClassificationOutput,
        "score": lambda value: ScoringOutput(float(value))}


class PrefillOnlyOutputProcessor(
        interfaces.OutputProcessor[PrefillOnlySchedulerOutput, list[torch.Tensor], PoolingRequestOutput]):
    @classmethod
    def from_engine(cls, engine) -> "PrefillOnlyOutputProcessor":
        return cls(engine.config, engine.workflow.task, engine.failures)

    def __init__(self, config, task: str, failures: RequestFailures | None = None):
        super().__init__(config)
        self.wrap = WRAP[task]
        self.failures = failures if failures is not None else RequestFailures()  # standalone: its own

    def __call__(self, scheduler_output: PrefillOnlySchedulerOutput, results: list[torch.Tensor]
                 ) -> list[PoolingRequestOutput]:
        outputs = []
        for item, result in zip(scheduler_output.scheduled, results):
            seq = item.seq
            if seq.aborted:  # while its step ran (async scheduling): the caller no longer waits for it
                continue
            try:
                outputs.append(PoolingRequestOutput(seq.request_id, self.wrap(result), seq.prompt_token_ids,
                                                    num_cached_tokens=item.num_cached_tokens))
            except Exception as e:  # noqa: BLE001 - only this input fails
                self.failures.record(seq.request, "making the outputs", e)
        return outputs

    def failed_output(self, failure: Failure) -> PoolingRequestOutput:
        request = failure.request
        return PoolingRequestOutput(request.request_id, None, request.prompt_token_ids or [], error=failure.message,
                                    internal_error=failure.internal)
