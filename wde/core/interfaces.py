"""The kinds of component a Workflow slot can name, and what each one must do.

The engine builds the engine-side components with `Kind.from_engine(engine)`, so a replacement can take
whatever it needs from the engine (its config, tokenizer, KV cache manager, other components). The Worker and
the AttentionBackend live where the model runs (one process per GPU under tensor parallelism), so they are
built from the engine config alone.
"""
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wde.core.config import EngineConfig
    from wde.core.engine.failures import Failure
    from wde.core.engine.stats import SchedulerStats
    from wde.core.engine.llm_engine import LLMEngine
    from wde.core.request import Request


class Component(ABC):
    """A piece of the pipeline that the engine builds from a Workflow slot."""

    @classmethod
    def from_engine(cls, engine: "LLMEngine") -> "Component":
        return cls(engine.config)

    def __init__(self, config: "EngineConfig"):
        self.config = config


class Tokenizer(Component):
    """Text <-> token ids, and the model's chat template."""

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    @abstractmethod
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


class InputProcessor(Component):
    """Validates and wraps what the user passed to add_request. Never tokenizes: bulk submission stays fast."""

    @abstractmethod
    def __call__(self, request_id: str, prompt: Any, params: Any, arrival_time: float) -> "Request": ...


class RequestProcessor(Component):
    """Turns a queued Request into the state the scheduler runs (tokenizes, truncates), lazily at schedule time."""

    @abstractmethod
    def __call__(self, request: "Request") -> Any: ...


class KVCacheManager(Component):
    """Owns the KV-cache block bookkeeping (which block holds which tokens of which sequence)."""


class Scheduler(Component):
    """Decides what runs at each step within the token, sequence and KV-block budgets.

    It tokenizes a request (through `engine.process_request`) only when it is about to admit it; a request
    that fails there comes back as None and is forgotten (the engine reports it). `abort_request` frees all a
    request holds, whatever its state: the engine also calls it for every request that failed in a step.
    """

    @abstractmethod
    def add_request(self, request: "Request") -> None: ...

    @abstractmethod
    def abort_request(self, request_id: str) -> bool: ...

    @abstractmethod
    def has_unfinished_requests(self) -> bool: ...

    @abstractmethod
    def schedule(self) -> Any: ...

    @abstractmethod
    def free_finished(self, scheduler_output: Any) -> None:
        """Release what the requests the OutputProcessor finished in this step held."""

    @abstractmethod
    def get_stats(self) -> "SchedulerStats": ...


class ModelPreProcessor(Component):
    """Scheduler output -> the flat tensors a model step needs (token ids, positions, slots, block tables)."""

    @abstractmethod
    def __call__(self, scheduler_output: Any) -> Any: ...


class FinishedStep:
    """A step that ran to its end: launch()'s result for workers that cannot return earlier."""

    def __init__(self, output: Any):
        self.output = output

    def result(self) -> Any:
        return self.output


class Executor(Component):
    """Runs model steps on one or more Workers."""

    @abstractmethod
    def execute_model(self, model_input: Any) -> Any: ...

    def launch(self, model_input: Any) -> Any:
        """Start a step and return what `.result()` waits for (async scheduling); by default, the step ends
        before this returns."""
        return FinishedStep(self.execute_model(model_input))

    @abstractmethod
    def shutdown(self) -> None:
        """Stop every process and release every device the executor started or holds."""


class Worker(ABC):
    """Owns one device: loads the model, allocates the KV cache and runs the forward pass.

    Built from the engine config and the workflow's resolved components (slot name -> class).
    """

    def __init__(self, config: "EngineConfig", components: dict[str, type] | None = None):
        self.config = config

    @abstractmethod
    def execute_model(self, model_input: Any) -> Any: ...

    def launch(self, model_input: Any) -> Any:
        """Start a step and return what `.result()` waits for; by default, the step ends before this returns."""
        return FinishedStep(self.execute_model(model_input))


class OutputProcessor(Component):
    """Model results -> RequestOutputs (appends tokens, detokenizes, decides what finished).

    The part of each request's work runs on its own: one that raises is recorded with
    `engine.failures.record(request, stage, error)` and left out, never let out of the call (which would fail
    the whole step's requests).
    """

    @abstractmethod
    def __call__(self, scheduler_output: Any, model_output: Any) -> Any: ...

    @abstractmethod
    def failed_output(self, failure: "Failure") -> Any:
        """The finished output of a request that failed, carrying `failure.message`."""


class AttentionBackend(ABC):
    """Computes attention for one layer; models never depend on which backend runs."""

    def __init__(self, config: "EngineConfig"):
        self.config = config

    @abstractmethod
    def forward(self, layer: Any, q: Any, k: Any, v: Any, attn_metadata: Any) -> Any:
        """q: [tokens, heads, head_dim], k and v: [tokens, kv_heads, head_dim] -> [tokens, heads, head_dim]."""


class Pooler(ABC):
    """Prefill-only models: hidden states of each finished input -> its result (embedding, score, classes).

    Lives with the model on its device; built from the engine config and the model (whose head it may use).
    """

    def __init__(self, config: "EngineConfig", model: Any):
        self.config = config
