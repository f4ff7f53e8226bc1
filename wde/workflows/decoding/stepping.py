"""Decoding's steps: synchronous, or overlapped with the device (`async_scheduling`, wde/core/engine/stepping.py).

A decode step's input is the token the last step sampled: rows whose input is a token of the step in flight
take it from that step's samples on the device. A sequence that the step in flight stops (EOS, stop string) was
already in the next one: that row's token is dropped. A constrained row's token that its matcher refused, and
that gave way to a runner-up on the host, was the wrong input of the next step: that row is dropped, and the
scheduler has its position computed again.
"""
from wde.core.engine.stepping import OverlappedStepper
from wde.core.sampling.sampler import SamplerOutput
from wde.workflows.decoding.scheduler import SchedulerOutput


class DecodingStepper(OverlappedStepper):
    def waits_for_last_step(self, scheduler_output: SchedulerOutput) -> bool:
        """Penalties and min_tokens read a sequence's output so far: its token in flight must arrive first."""
        return self.model_pre_processor.needs_known_tokens(scheduler_output)

    def reconcile(self, finished: SchedulerOutput, model_output: SamplerOutput, launched: SchedulerOutput) -> None:
        if not model_output.replaced_rows:
            return
        sampled = [s.seq for s in finished.scheduled if s.samples]
        replaced = {id(sampled[row]) for row in model_output.replaced_rows}
        for item in launched.scheduled:
            # its input was the replaced token, taken from the device: the token the sequence now ends with
            if id(item.seq) in replaced and item.start == len(item.seq.token_ids) - 1 and not item.seq.is_finished:
                self.scheduler.rewind(item)
