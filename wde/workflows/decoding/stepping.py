"""Decoding's steps: synchronous, or overlapped with the device (`async_scheduling`).

A decode step's input is the token the last step sampled, so only decoding has steps worth overlapping: while
step k runs on the device, step k+1 is scheduled, built and launched (rows whose input is a token step k
samples take it from k's samples on the device), and then step k's outputs are made while k+1 runs.
"""
import time
from typing import Any

from wde.core.engine.stepping import SyncStepper
from wde.core.outputs import RequestOutput
from wde.core.parallel.multiproc_executor import ExecutorDeadError
from wde.workflows.decoding.scheduler import SchedulerOutput


class DecodingStepper(SyncStepper):
    overlaps_steps = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.overlapped = self.config.args.async_scheduling
        self.in_flight: tuple[SchedulerOutput, Any] | None = None  # (scheduler output, launched step)

    def step(self) -> list[RequestOutput]:
        return self._step_overlapped() if self.overlapped else super().step()

    def _step_overlapped(self) -> list[RequestOutput]:
        """Returns step k's outputs, having launched step k+1. A sequence that step k stops (EOS, stop string)
        was already in k+1: that row's token is dropped."""
        times = self.times
        start = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        previous, self.in_flight = self.in_flight, None
        outputs: list[RequestOutput] = []
        if previous is not None and (not scheduler_output.scheduled
                                     or self.model_pre_processor.needs_known_tokens(scheduler_output)):
            outputs += self._finish_in_flight(previous, self._collect(previous))
            previous = None
            # what that step stopped has no blocks any more: it leaves this step
            scheduler_output.scheduled = [s for s in scheduler_output.scheduled if not s.seq.is_finished]
        if not scheduler_output.scheduled:
            return outputs + self.finish_step(scheduler_output, None)
        model_input, scheduler_output = self.build_model_input(scheduler_output)
        scheduled = time.perf_counter()
        if model_input is not None:
            try:
                self.in_flight = (scheduler_output, self.executor.launch(model_input))
            except ExecutorDeadError:
                raise
            except Exception as e:  # noqa: BLE001
                self.fail_step(scheduler_output, e)
        if self.in_flight is None:  # nothing was launched: what this step scheduled is done with
            outputs += self.finish_step(scheduler_output, None)
        sampled = self._collect(previous) if previous is not None else None
        collected = time.perf_counter()
        times.schedule_s += scheduled - start
        times.execute_s += collected - scheduled
        times.num_steps += 1
        outputs += self._finish_in_flight(previous, sampled)
        times.output_s += time.perf_counter() - collected
        return outputs

    def _collect(self, in_flight: tuple[SchedulerOutput, Any]) -> Any:
        """The launched step's sampled tokens, or None with its requests failed."""
        try:
            return in_flight[1].result()
        except ExecutorDeadError:
            raise
        except Exception as e:  # noqa: BLE001
            self.fail_step(in_flight[0], e)
            return None

    def _finish_in_flight(self, in_flight: tuple[SchedulerOutput, Any] | None, sampled: Any) -> list[RequestOutput]:
        """Outputs of a launched step whose tokens arrived (none for a step that failed: its requests did)."""
        return [] if in_flight is None else self.finish_step(in_flight[0], sampled)
