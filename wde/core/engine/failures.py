"""Where a request's own failure is caught: whatever one request carries, it fails alone.

The engine owns one RequestFailures and is the only place that turns a recorded failure into that request's
end: after every step it aborts each failed request (its KV blocks are freed) and hands back one output with
the error. Components never catch a request's exception themselves; they run the per-request part of their
work through `guard`, which records the failure and lets them skip that request. Stages that work on a whole
step (building its tensors, the forward pass, sampling, pooling) are guarded by the engine.

A failure is the client's when our own checks refused what the request carries (a ValueError or TypeError
raised while reading its input or tokenizing it); anything else is internal, the engine's fault, which the
server answers with a 5xx.
"""
import logging
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from wde.core.request import Request

logger = logging.getLogger(__name__)
T = TypeVar("T")

# stages whose ValueError / TypeError mean "the request is wrong" rather than "the engine is wrong"
CLIENT_STAGES = frozenset({"input processing", "request processing"})


class RequestContentError(ValueError):
    """What a request carries cannot go on, found past the stages that read its input (its structured output's
    constraint allows no token at some point): the client's failure, whatever the stage."""


@dataclass
class Failure:
    request: Request
    message: str  # names what was wrong (and, for an internal failure, the stage and the exception)
    internal: bool  # the engine's fault, not the request's


class RequestFailures:
    def __init__(self) -> None:
        self._failed: dict[str, Failure] = {}  # request id -> its first failure, until the engine reports it

    def record(self, request: Request, stage: str, error: BaseException, log: bool = True) -> None:
        """Note that `request` failed in `stage`; its first failure is the one reported."""
        if request.request_id in self._failed:
            return
        client = isinstance(error, RequestContentError) or (stage in CLIENT_STAGES
                                                            and isinstance(error, (ValueError, TypeError)))
        message = str(error) if client and str(error) else f"{stage} failed: {type(error).__name__}: {error}"
        if log and client:
            logger.warning("request %s refused: %s", request.request_id, message)
        elif log:
            logger.error("request %s failed: %s", request.request_id, message, exc_info=error)
        self._failed[request.request_id] = Failure(request, message, internal=not client)

    def guard(self, request: Request, stage: str, work: Callable[..., T], *args: Any) -> T | None:
        """work(*args), or None with the failure recorded if it raised."""
        try:
            return work(*args)
        except Exception as error:  # noqa: BLE001 - whatever it was, only this request fails
            self.record(request, stage, error)
            return None

    def has_failed(self, request_id: str) -> bool:
        return request_id in self._failed

    def take(self) -> list[Failure]:
        """The failures recorded since the last call, oldest first."""
        failed, self._failed = list(self._failed.values()), {}
        return failed
