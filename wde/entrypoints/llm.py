"""LLM: the offline API vLLM users know, over an LLMEngine."""
import contextlib
import gc
import itertools
import logging
import time
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from wde.core.config import EngineArgs
from wde.core.engine.llm_engine import LLMEngine
from wde.core.engine.stats import EngineStats
from wde.core.inputs import coerce_params
from wde.core.outputs import PoolingRequestOutput, RequestOutput
from wde.core.pooling_params import PoolingParams
from wde.core.sampling.sampling_params import RequestOutputKind, SamplingParams
from wde.entrypoints.openai.served_engine import Refused, add_all

logger = logging.getLogger(__name__)


class LLM:
    """LLM(model=..., **engine_args): `model` is an HF folder or a .gguf file (default: SmolLM2-135M-Instruct).

    What the engine does follows the model's architecture (or `task=`): generate / chat, embed, score, classify.
    """

    def __init__(self, model: str | None = None, **engine_args: Any):
        """With data_parallel_size=N, N engine processes (each on tensor_parallel_size GPUs of its own) share
        every call's prompts (llm_replicas.py); `engine` is then None and `replicas` holds them."""
        engine_args.setdefault("disable_log_stats", True)  # the progress bar shows the rates
        self.engine: LLMEngine | None = None
        self.replicas = None
        args = EngineArgs(model=model, **engine_args)
        if args.data_parallel_size > 1:
            try:
                from wde.entrypoints.llm_replicas import LLMReplicas
            except ImportError as e:
                raise ImportError(f"data_parallel_size > 1 runs engine processes that ZeroMQ and msgspec talk to: "
                                  f"pip install 'wde[serve]' ({e})") from e
            self.replicas = LLMReplicas(args)
            self._task, self._workflow_name = self.replicas.task, self.replicas.workflow_name
        else:
            self.engine = LLMEngine.from_engine_args(args)
            self._task, self._workflow_name = self.engine.workflow.task, self.engine.workflow.__name__
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return (self.engine or self.replicas).tokenizer

    def get_stats(self) -> EngineStats:
        """The engine's counters (of all replicas added up, with data_parallel_size > 1)."""
        return (self.engine or self.replicas).get_stats()

    def close(self) -> None:
        """Stop tensor-parallel workers and data-parallel replicas now (otherwise when the LLM is
        garbage-collected, or at exit)."""
        (self.engine or self.replicas).close()

    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete each prompt (a str, a list of token ids, or a list of either); outputs in input order.

        A prompt the engine refuses once tokenized (too long) comes back with finish_reason "error" and its
        `error` set, and the other prompts still complete.
        """
        self._require_task("generate")
        prompts = _as_prompt_list(prompts)
        return self._run(prompts, _params_per_prompt(sampling_params, len(prompts), SamplingParams), SamplingParams,
                         use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} dicts) or several, with the chat template."""
        self._require_task("generate")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.get_tokenizer().encode_chat(conv) for conv in conversations]
        return self._run(prompts, _params_per_prompt(sampling_params, len(prompts), SamplingParams), SamplingParams,
                         use_tqdm)

    def embed(self, prompts: Any, pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
              use_tqdm: bool = True) -> list[PoolingRequestOutput]:
        """One vector per input (`.outputs.embedding`), in input order."""
        self._require_task("embed")
        prompts = _as_prompt_list(prompts)
        return self._run(prompts, _params_per_prompt(pooling_params, len(prompts), PoolingParams), PoolingParams,
                         use_tqdm)

    def classify(self, prompts: Any, pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
                 use_tqdm: bool = True) -> list[PoolingRequestOutput]:
        """Class probabilities per input (`.outputs.probs`), in input order."""
        self._require_task("classify")
        prompts = _as_prompt_list(prompts)
        return self._run(prompts, _params_per_prompt(pooling_params, len(prompts), PoolingParams), PoolingParams,
                         use_tqdm)

    def score(self, queries: Any, documents: Any, pooling_params: PoolingParams | None = None,
              use_tqdm: bool = True) -> list[PoolingRequestOutput]:
        """Relevance of each document to the query (`.outputs.score`): one query against many documents, or
        queries and documents paired one to one."""
        self._require_task("score")
        queries, documents = _as_prompt_list(queries), _as_prompt_list(documents)
        if len(queries) == 1:
            queries = queries * len(documents)
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries for {len(documents)} documents: give one query, or one per "
                             "document")
        pairs = list(zip(queries, documents))
        return self._run(pairs, _params_per_prompt(pooling_params, len(pairs), PoolingParams), PoolingParams,
                         use_tqdm)

    def _require_task(self, task: str) -> None:
        if self._task != task:
            raise ValueError(f"this engine's model is served for {self._task!r} ({self._workflow_name}), not "
                             f"{task!r}: load a model made for it, or pass task={task!r} if the model can do it")

    def _run(self, prompts: list, params: list, kind: type, use_tqdm: bool) -> list:
        with no_full_collections():
            return self._submit_and_run(prompts, params, kind, use_tqdm)

    def _submit_and_run(self, prompts: list, params: list, kind: type, use_tqdm: bool) -> list:
        requests = []
        for prompt, prompt_params in zip(prompts, params):
            try:
                prompt_params = coerce_params(prompt_params, kind)
            except (ValueError, TypeError) as e:
                raise refusal(Refused(len(requests), e)) from e
            if isinstance(prompt_params, SamplingParams):  # only the final output of each is wanted
                prompt_params = prompt_params.model_copy(update={"output_kind": RequestOutputKind.FINAL_ONLY})
            requests.append((str(next(self._request_counter)), prompt, prompt_params))
        progress = Progress(len(requests), use_tqdm)
        try:
            finished = self._run_requests(requests, progress.finished)
        except Refused as e:
            raise refusal(e) from e
        finally:
            progress.close()
        return [finished[request_id] for request_id, _, _ in requests]

    def _run_requests(self, requests: list, on_finished: Callable[[Any], None]) -> dict:
        if self.replicas is not None:
            return self.replicas.run(requests, on_finished)
        refused = add_all(self.engine, requests)
        if refused is not None:
            raise refused
        finished = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
                    on_finished(output)
        return finished


class Progress:
    """The progress bar of a call: prompts finished, and the input (and output) token rates so far."""

    LOGGED_FAILURES = 5  # failed requests logged one by one; the rest are counted (a dead replica fails many)

    def __init__(self, total: int, shown: bool):
        self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True, disable=not shown)
        self.start, self.prompt_tokens, self.output_tokens, self.failures = time.perf_counter(), 0, 0, 0

    def finished(self, output: Any) -> None:
        if output.error:
            self.failures += 1
            if self.failures <= self.LOGGED_FAILURES:
                logger.warning("request %s failed: %s", output.request_id, output.error)
        self.prompt_tokens += len(output.prompt_token_ids)
        if isinstance(output, RequestOutput):
            self.output_tokens += sum(len(c.token_ids) for c in output.outputs)
        elapsed = time.perf_counter() - self.start
        rates = f"input: {self.prompt_tokens / elapsed:.0f} tok/s"
        if self.output_tokens:
            rates += f", output: {self.output_tokens / elapsed:.0f} tok/s"
        self.bar.set_postfix_str(rates, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.failures > self.LOGGED_FAILURES:
            logger.warning("%d more requests failed (the outputs' `error` says why)",
                           self.failures - self.LOGGED_FAILURES)


def refusal(refused: Refused) -> Exception:
    """A refused prompt as the caller's error, naming which (a plain ValueError / TypeError: not every exception
    type can be made from a message; pydantic's ValidationError cannot); an error of the engine's as it is."""
    error = refused.error
    if isinstance(error, (ValueError, TypeError)):
        return (TypeError if isinstance(error, TypeError) else ValueError)(f"prompt {refused.index}: {error}")
    return error


@contextlib.contextmanager
def no_full_collections():
    """While a batch runs, the collector makes no full (oldest-generation) collection: each one walks every
    object of the engine and the model, and the requests and outputs of a big batch would trigger them again
    and again (with 8,192 embeddings, 90% of the host time making outputs). Young garbage is still collected;
    afterwards the thresholds are what they were. Neither freezes anything (a caller's gc.freeze() stands)."""
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], 1 << 30)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


def _as_prompt_list(prompts: Any) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int) \
            and not isinstance(prompts[0], bool):
        return [list(prompts)]  # one prompt given as token ids
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    raise TypeError(f"prompts must be a str, a list of token ids, or a list of those; not {type(prompts).__name__}")


def _params_per_prompt(params: Any, count: int, kind: type) -> list:
    """One `kind` (or dict of its fields) for every prompt, or a list of one per prompt."""
    if params is None:
        return [kind()] * count
    if isinstance(params, (kind, dict)):
        return [params] * count
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be {kind.__name__}, a dict of its fields, or a list of one per prompt; not "
                        f"{type(params).__name__}")
    if len(params) != count:
        raise ValueError(f"{len(params)} {kind.__name__} for {count} prompts")
    return list(params)
