"""Decoding's steps: synchronous, or overlapped with the device (`async_scheduling`, wde/core/engine/stepping.py).

A decode step's input is the token the last step sampled: rows whose input is a token of the step in flight
take it from that step's samples on the device. A sequence that the step in flight stops (EOS, stop string) was
already in the next one: that row's token is dropped.
"""
from wde.core.engine.stepping import OverlappedStepper
from wde.workflows.decoding.scheduler import SchedulerOutput


class DecodingStepper(OverlappedStepper):
    def waits_for_last_step(self, scheduler_output: SchedulerOutput) -> bool:
        """Penalties and min_tokens read a sequence's output so far: its token in flight must arrive first."""
        return self.model_pre_processor.needs_known_tokens(scheduler_output)
