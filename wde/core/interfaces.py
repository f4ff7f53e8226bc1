"""The kinds of component a Workflow slot can name, and what each one must do.

A step passes typed data from slot to slot; the type variables below name it, and each workflow family binds
them to its own classes (decoding: SequenceGroup, its SchedulerOutput, ModelInput, SamplerOutput,
RequestOutput):

    add_request --InputProcessor--> Request --Scheduler.add_request
    Scheduler.schedule --RequestProcessor (lazily)--> StateT --> SchedulerOutputT
    --ModelPreProcessor--> ModelInputT --Executor/Worker--> ModelOutputT --OutputProcessor--> OutputT

The Stepper runs that chain once per `LLMEngine.step()`. The engine builds the engine-side components with
`Kind.from_engine(engine)`, so a replacement can take whatever it needs from the engine (its config,
tokenizer, KV cache manager, other components). The Worker, the AttentionBackend and the Pooler live where the
model runs (one process per GPU under tensor parallelism), so they are built from the engine config and the
resolved components alone. A slot's class must implement every abstract method of its kind:
`Workflow.resolve()` refuses one that does not.
"""
from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from wde.core.kv_cache.host_tier import BlockCopies, HostTier

if TYPE_CHECKING:
    from wde.core.config import EngineConfig
    from wde.core.engine.failures import Failure
    from wde.core.engine.scheduler_output import SchedulerOutput
    from wde.core.engine.stats import SchedulerStats
    from wde.core.kv_cache.layer_groups import KVLayerGroups
    from wde.core.engine.llm_engine import LLMEngine
    from wde.core.request import Request
    from wde.core.tokenizer import IncrementalDecoder


class ModelInput(Protocol):
    """One step's input, as the Worker of rank 0 receives it."""

    def for_workers(self) -> "ModelInput":
        """What the other tensor-parallel ranks need of it (rank 0 alone samples and pools)."""


StateT = TypeVar("StateT")  # a request's state once processed: decoding's SequenceGroup, a PrefillOnlySequence
SchedulerOutputT = TypeVar("SchedulerOutputT", bound="SchedulerOutput")
ModelInputT = TypeVar("ModelInputT", bound=ModelInput)
ModelOutputT = TypeVar("ModelOutputT")  # what a step returns on rank 0: a SamplerOutput, pooled tensors
OutputT = TypeVar("OutputT")  # what the caller gets: RequestOutput, PoolingRequestOutput


class Component(ABC):
    """A piece of the pipeline that the engine builds from a Workflow slot."""

    @classmethod
    def from_engine(cls, engine: "LLMEngine") -> "Component":
        return cls(engine.config)

    def __init__(self, config: "EngineConfig"):
        self.config = config


class Tokenizer(Component):
    """Text <-> token ids, pairs for cross-encoders, streaming text, and the model's chat template."""

    eos_token_id: int | None
    # the most characters one token stands for, when known: a text that long times the context length cannot
    # fit, and is refused without being tokenized
    max_token_chars: int | None = None

    @abstractmethod
    def __len__(self) -> int:
        """The vocabulary's size, special tokens included."""

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """Token ids of `text`, cut to `max_length` when given."""

    @abstractmethod
    def encode_pair(self, first: str, second: str, max_length: int | None = None,
                    token_type_ids: bool = False) -> tuple[list[int], list[int] | None]:
        """Token ids of a (query, document) pair with the model's separators, `second` cut to fit
        `max_length`; and its token type ids, when asked and the tokenizer has them."""

    @abstractmethod
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...

    @abstractmethod
    def decode_stream(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        """A decoder fed one token at a time whose text never shows a broken character."""

    @abstractmethod
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The conversation as the model's chat template writes it (tools: OpenAI's tool definitions, for a
        template that describes them); ValueError naming what is wrong."""

    @abstractmethod
    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The token ids of the conversation's chat prompt."""


class InputProcessor(Component):
    """Validates and wraps what the user passed to add_request. Never tokenizes: bulk submission stays fast."""

    @abstractmethod
    def __call__(self, request_id: str, prompt: Any, params: Any, arrival_time: float) -> "Request": ...


class RequestProcessor(Component, Generic[StateT]):
    """Turns a queued Request into the state the scheduler runs (tokenizes, truncates), lazily at schedule time.
    Raises ValueError / TypeError for what the request carries."""

    @abstractmethod
    def __call__(self, request: "Request") -> StateT: ...


class KVCacheManager(Component):
    """Owns the KV-cache block bookkeeping: which block holds which tokens of which sequence, in each KV layer
    group (wde/core/kv_cache/layer_groups.py). It is the one writer of a sequence's `block_table`,
    `block_hashes`, `num_freed_blocks`, `group_tables` and `group_freed_blocks`; the scheduler owns
    `num_computed_tokens`. An encoder's engine has one with no blocks."""

    block_size: int
    enable_prefix_caching: bool
    window: int | None = None  # every attention layer reads within this window: older blocks go back
    host_tier: HostTier | None = None  # the KV cache's second tier in host memory (kv_offload_gib)

    @property
    @abstractmethod
    def num_blocks(self) -> int: ...

    @property
    @abstractmethod
    def num_free_blocks(self) -> int: ...

    @property
    @abstractmethod
    def prefix_cache_hit_rate(self) -> float: ...

    @abstractmethod
    def allocate_cached_prefix(self, seq: Any, max_new_tokens: int) -> int:
        """At admission, share the cached blocks holding the start of `seq`; return how many tokens they hold
        (`max_new_tokens`: the most the step computes for it after them)."""

    @abstractmethod
    def allocate_slots(self, seq: Any, num_new_tokens: int) -> bool:
        """Blocks for `num_new_tokens` more tokens after `num_computed_tokens`; False, nothing changed, if too
        few are free."""

    @abstractmethod
    def free(self, seq: Any) -> None:
        """Give back every block `seq` holds."""

    def free_outside_window(self, seq: Any) -> None:
        """Give back the blocks of `seq` that no token to come reads (the layers that attend within a window);
        by default none."""

    def longest_sequence(self, max_step_tokens: int, max_model_len: int) -> int:
        """The most tokens one sequence can reach alone in the cache, up to max_model_len (a sequence that fits
        alone can always run, after preempting the others); by default all its blocks count."""
        return min(max_model_len, self.num_blocks * self.block_size)

    @abstractmethod
    def forget(self, blocks: set[int]) -> None:
        """Blocks a failed step was to write: never hand them out from the prefix cache."""

    @abstractmethod
    def count_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None: ...

    def swap_out(self, seq: Any) -> int:
        """`seq` is about to be preempted: keep what of its KV it can where it finds it on resuming; how many
        blocks. By default (no host tier) nothing: it computes its tokens again."""
        return 0

    def take_copies(self) -> BlockCopies:
        """The copies between the KV cache's tiers that the step just scheduled runs before its forward pass
        (wde/core/kv_cache/host_tier.py); by default, with no host tier, none."""
        return BlockCopies()

    def drop_copies(self, copies: BlockCopies) -> None:
        """A step's copies that may not have run (it failed, or never launched): forget what they were to fill;
        by default there are none."""


class Scheduler(Component, Generic[SchedulerOutputT]):
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
    def schedule(self) -> SchedulerOutputT: ...

    @abstractmethod
    def free_finished(self, scheduler_output: SchedulerOutputT) -> None:
        """Release what the requests the OutputProcessor finished in this step held."""

    @abstractmethod
    def get_stats(self) -> "SchedulerStats": ...


class ModelPreProcessor(Component, Generic[SchedulerOutputT, ModelInputT]):
    """Scheduler output -> the flat tensors a model step needs (token ids, positions, slots, block tables).
    Writes nothing to a sequence unless the whole step is built."""

    @abstractmethod
    def __call__(self, scheduler_output: SchedulerOutputT) -> ModelInputT: ...


class LaunchedStep(ABC, Generic[ModelOutputT]):
    """What launch() returns: a step queued on the device, whose output `result()` waits for.

    A step may hold back the part of its work that reads what the step before it produced on the host (the
    decoding worker's constrained sampling, whose masks come from matchers that take that step's tokens):
    async scheduling launches it, makes the outputs of the step before, then calls `proceed()`. result()
    proceeds first when nobody did."""

    def proceed(self) -> None:
        """Queue what was held back (by default nothing is)."""

    @abstractmethod
    def result(self) -> ModelOutputT: ...


class FinishedStep(LaunchedStep[ModelOutputT]):
    """A step that ran to its end: launch()'s result for workers that cannot return earlier."""

    def __init__(self, output: ModelOutputT):
        self.output = output

    def result(self) -> ModelOutputT:
        return self.output


class Executor(Component, Generic[ModelInputT, ModelOutputT]):
    """Runs model steps on one or more Workers. `num_kv_blocks`: the KV-cache blocks every worker holds;
    `kv_layer_groups`: which layers share them (wde/core/kv_cache/layer_groups.py), the same on every worker;
    `num_host_kv_blocks`: the blocks of each worker's host tier (kv_offload_gib; none by default), and
    `host_kv_block_bytes` what one of them holds over all workers."""

    supports_tensor_parallel: ClassVar[bool] = False  # may run with tensor_parallel_size > 1
    num_kv_blocks: int
    num_host_kv_blocks: int = 0
    host_kv_block_bytes: int = 0
    kv_layer_groups: "KVLayerGroups"

    @classmethod
    def from_engine(cls, engine: "LLMEngine") -> "Executor":
        return cls(engine.config, engine.components)

    def __init__(self, config: "EngineConfig", components: dict[str, type]):
        super().__init__(config)

    @abstractmethod
    def execute_model(self, model_input: ModelInputT) -> ModelOutputT: ...

    def launch(self, model_input: ModelInputT) -> LaunchedStep[ModelOutputT]:
        """Start a step and return what `.result()` waits for (async scheduling); by default, the step ends
        before this returns."""
        return FinishedStep(self.execute_model(model_input))

    def host_copy_wait_s(self) -> float:
        """Seconds the steps have waited on KV copies from the host tier (the first worker's); by default none."""
        return 0.0

    @abstractmethod
    def shutdown(self) -> None:
        """Stop every process and release every device the executor started or holds."""


class Worker(ABC, Generic[ModelInputT, ModelOutputT]):
    """Owns one device: loads the model, allocates the KV cache and runs the forward pass.

    Built from the engine config and the workflow's resolved components (slot name -> class).
    """

    def __init__(self, config: "EngineConfig", components: dict[str, type] | None = None):
        self.config = config

    @abstractmethod
    def determine_num_kv_blocks(self) -> int:
        """How many KV-cache blocks fit this device (0 for an encoder)."""

    @abstractmethod
    def init_kv_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute_model(self, model_input: ModelInputT) -> ModelOutputT: ...

    def launch(self, model_input: ModelInputT) -> LaunchedStep[ModelOutputT]:
        """Start a step and return what `.result()` waits for; by default, the step ends before this returns."""
        return FinishedStep(self.execute_model(model_input))


class OutputProcessor(Component, Generic[SchedulerOutputT, ModelOutputT, OutputT]):
    """Model results -> the caller's outputs (appends tokens, detokenizes, decides what finished).

    The part of each request's work runs on its own: one that raises is recorded with
    `engine.failures.record(request, stage, error)` and left out, never let out of the call (which would fail
    the whole step's requests).
    """

    @abstractmethod
    def __call__(self, scheduler_output: SchedulerOutputT, model_output: ModelOutputT) -> list[OutputT]: ...

    @abstractmethod
    def failed_output(self, failure: "Failure") -> OutputT:
        """The finished output of a request that failed, carrying `failure.message`."""


class StructuredOutputBackend(Component):
    """Decoding under a constraint (SamplingParams.structured_outputs): a grammar engine's compiler, matchers
    and token masks. The engine builds it once (the `StructuredOutputs` slot of a decoding workflow); the
    InputProcessor starts each request's compilation, the RequestProcessor gives each sequence a matcher, the
    ModelPreProcessor asks for the step's mask, the OutputProcessor advances the matchers."""

    @abstractmethod
    def compile(self, spec: Any) -> Future:
        """Start compiling `spec` (a StructuredOutputsParams) off the step's path; the Future's result is the
        compiled grammar, or raises (ValueError) with the grammar engine's message."""

    @abstractmethod
    def new_matcher(self, grammar: Any, prompt_token_ids: list[int]) -> "GrammarMatcher":
        """A matcher at the start of `grammar` (a compiled grammar, the result of compile()'s Future) for an
        output that follows `prompt_token_ids` (a reasoning model's prompt may leave its reasoning open)."""

    @abstractmethod
    def token_mask(self, rows: list[int], matchers: list["GrammarMatcher"]) -> "TokenMask":
        """The mask of the step's sampling rows `rows`, each constrained by its matcher, as the Sampler applies
        it (filled on the host when applied, which is once the step's forward pass is queued on the device and,
        with async scheduling, once the matchers took the tokens of the step before; a matcher that is
        terminated by then leaves its row open: that row's token is dropped)."""


class GrammarMatcher(Protocol):
    def accept_token(self, token_id: int) -> bool: ...  # False: the grammar does not allow it here

    def is_terminated(self) -> bool: ...  # the constraint is complete (its stop token accepted)


class TokenMask(Protocol):
    rows: list[int]  # the rows of the step's logits it constrains

    def prepare(self, logits: Any) -> None:
        """Start filling the mask for `logits` ([rows, vocabulary]) on the host, in the background: the matchers
        are not to be touched by anyone else until apply() returns."""

    def apply(self, logits: Any) -> None:
        """Set the logits of the tokens the constraints forbid to -inf, in place (filling the mask first if
        nobody prepared it)."""


class Stepper(Component, Generic[OutputT]):
    """Runs one step of the pipeline: schedule, build the model input, execute, make the outputs.

    The engine's `step()` is this plus reporting the requests that failed in it, whatever the workflow.
    `overlaps_steps`: it can launch a step before the last one's outputs are made (`async_scheduling`).
    """

    overlaps_steps: ClassVar[bool] = False

    @abstractmethod
    def step(self) -> list[OutputT]: ...


class AttentionBackend(ABC):
    """Computes attention for one layer; models never depend on which backend runs.

    `kind` says which attention it computes ("paged": causal, over the paged KV cache; "encoder":
    bidirectional within each input, nothing cached); it must match the workflow's `causal`.
    """

    kind: ClassVar[str | None] = None  # a backend that does not say is refused by resolve() and the selector
    supports_cuda_graphs: ClassVar[bool] = False  # its forward over a decode step can be captured in a CUDA graph
    # its forward over a step with prefill reads the batch's lengths from the device tensors alone (the host
    # lists only bound its launches), so such a step, padded, can be captured too
    supports_prefill_cuda_graphs: ClassVar[bool] = False
    # forward takes `rotation=` (wde.core.layers.rotary.Rotation) and rotates q and k itself, fused with its
    # K/V store; otherwise the layer rotates them before calling forward
    fuses_rotation: ClassVar[bool] = False

    def __init__(self, config: "EngineConfig"):
        self.config = config

    @classmethod
    def is_available(cls, config: "EngineConfig") -> str | None:
        """None if it can run with this config; else why not (a missing package, the device)."""
        return None

    @abstractmethod
    def forward(self, layer: Any, q: Any, k: Any, v: Any, attn_metadata: Any) -> Any:
        """q: [tokens, heads, head_dim], k and v: [tokens, kv_heads, head_dim] -> [tokens, heads, head_dim]."""


class Pooler(ABC):
    """Prefill-only models: hidden states of each finished input -> its result (embedding, score, classes).

    Lives with the model on its device; the Worker builds it with `from_worker`, from the engine config, the
    model (whose head it may use) and the resolved components (a pooler that reads the token ids of words
    builds the workflow's Tokenizer from them).
    """

    @classmethod
    def from_worker(cls, config: "EngineConfig", model: Any, components: dict[str, type]) -> "Pooler":
        return cls(config, model)

    def __init__(self, config: "EngineConfig", model: Any):
        self.config = config

    @abstractmethod
    def __call__(self, hidden: Any, pooling_metadata: Any) -> Any:
        """One result per input, on the model's device (the Worker brings them to the host in one copy): a
        tensor whose rows are the inputs' results, or a list of one tensor per input."""
