"""LLM: the offline API vLLM users know, over an LLMEngine."""
import contextlib
import gc
import itertools
import logging
import time
from typing import Any, Sequence

from tqdm.auto import tqdm

from wde.core.engine.llm_engine import LLMEngine
from wde.core.inputs import coerce_params
from wde.core.outputs import PoolingRequestOutput, RequestOutput
from wde.core.pooling_params import PoolingParams
from wde.core.sampling.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


class LLM:
    """LLM(model=..., **engine_args): `model` is an HF folder or a .gguf file (default: SmolLM2-135M-Instruct).

    What the engine does follows the model's architecture (or `task=`): generate / chat, embed, score, classify.
    """

    def __init__(self, model: str | None = None, **engine_args: Any):
        engine_args.setdefault("disable_log_stats", True)  # the progress bar shows the rates
        self.engine = LLMEngine.from_engine_args(model=model, **engine_args)
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def close(self) -> None:
        """Stop tensor-parallel worker processes now (otherwise when the LLM is garbage-collected)."""
        self.engine.close()

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
        workflow = self.engine.workflow
        if workflow.task != task:
            raise ValueError(f"this engine's model is served for {workflow.task!r} ({workflow.__name__}), not "
                             f"{task!r}: load a model made for it, or pass task={task!r} if the model can do it")

    def _run(self, prompts: list, params: list, kind: type, use_tqdm: bool) -> list:
        with no_full_collections():
            return self._submit_and_run(prompts, params, kind, use_tqdm)

    def _submit_and_run(self, prompts: list, params: list, kind: type, use_tqdm: bool) -> list:
        request_ids = []
        try:
            for prompt, prompt_params in zip(prompts, params):
                request_id = str(next(self._request_counter))
                prompt_params = coerce_params(prompt_params, kind)
                if isinstance(prompt_params, SamplingParams):  # only the final output of each is wanted
                    prompt_params = prompt_params.model_copy(update={"output_kind": RequestOutputKind.FINAL_ONLY})
                self.engine.add_request(request_id, prompt, prompt_params)
                request_ids.append(request_id)
        except (ValueError, TypeError) as e:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            # as a plain ValueError / TypeError: not every exception type can be made from a message
            # (pydantic's ValidationError cannot)
            raise (TypeError if isinstance(e, TypeError) else ValueError)(f"prompt {len(request_ids)}: {e}") from e
        finished = self._run_engine(len(request_ids), use_tqdm)
        return [finished[request_id] for request_id in request_ids]

    def _run_engine(self, num_requests: int, use_tqdm: bool) -> dict:
        finished = {}
        bar = tqdm(total=num_requests, desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        start, prompt_tokens, output_tokens = time.perf_counter(), 0, 0
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if not output.finished:
                    continue
                finished[output.request_id] = output
                if output.error:
                    logger.warning("request %s failed: %s", output.request_id, output.error)
                prompt_tokens += len(output.prompt_token_ids)
                if isinstance(output, RequestOutput):
                    output_tokens += sum(len(c.token_ids) for c in output.outputs)
                elapsed = time.perf_counter() - start
                rates = f"input: {prompt_tokens / elapsed:.0f} tok/s"
                if output_tokens:
                    rates += f", output: {output_tokens / elapsed:.0f} tok/s"
                bar.set_postfix_str(rates, refresh=False)
                bar.update(1)
        bar.close()
        return finished


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
