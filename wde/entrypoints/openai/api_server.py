"""The OpenAI-compatible server: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/rerank,
and vLLM's /v1/score, /v1/classify, /tokenize and /detokenize; /health, /metrics and /openapi.json; over one
engine per served model (ServedEngine: in its own process under `wde serve`).

Starlette, not FastAPI: every body is read by hand (a size cap while it streams in, json's messages, a nesting
limit that never becomes a 500), which FastAPI's own parsing and 422 errors would replace with less; the
OpenAPI document FastAPI would publish is made here from the same pydantic models (openapi_document).

Every request body is checked by a pydantic model (unknown fields and out-of-range values get a 400 in OpenAI's
error shape), its size is bounded (413), and with an API key every request but /health needs
`Authorization: Bearer KEY` (401). A client's mistake is always a 4xx, also when it is found once the request
runs (a streamed request then ends with an error event); 5xx means the server is at fault. A client that
disconnects aborts its request, which frees its KV blocks.
"""
import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

import msgspec
import numpy as np
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from wde.core.pooling_params import PoolingParams
from wde.entrypoints.openai import metrics
from wde.entrypoints.openai.errors import APIError, from_validation_error
from wde.entrypoints.openai.protocol import (ChatCompletionRequest, ClassificationRequest, CompletionRequest,
                                             DetokenizeRequest, EmbeddingRequest, RerankRequest, ScoreRequest,
                                             TokenizeRequest)
from wde.entrypoints.openai.served_engine import EngineStopped, Refused, ServedEngine
from wde.entrypoints.openai.streaming import Outputs, coalesce
from wde.entrypoints.openai.reasoning import ReasoningSplitter, split_reasoning
from wde.entrypoints.openai.tool_calls import TOOL_CALL_PARSERS, forced_calls

logger = logging.getLogger(__name__)
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
# Unicode normalization can fold a few characters into one before tokenizing: a prompt is refused untokenized
# only when it is this many times longer than the longest text that could fit
NORMALIZATION_SLACK = 4
TOKENIZER_THREADS = 4  # the Rust tokenizer lets go of the GIL: prompts are tokenized side by side
STATS_TIMEOUT_S = 2.0  # /metrics answers without an engine that takes longer
BODY_TIMEOUT_S = 30.0  # a body that has not all arrived by then is refused (a half-sent one held its connection)


class Server:
    def __init__(self, engines: dict[str, ServedEngine], api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, tool_call_parser: str = "hermes",
                 reasoning_parser: str | None = None):
        self.engines, self.api_key, self.max_body_bytes = engines, api_key, max_body_bytes
        self.tool_call_parser = TOOL_CALL_PARSERS[tool_call_parser]  # how tool_choice "auto" finds the calls
        self.splits_reasoning = reasoning_parser is not None  # qwen3 / deepseek_r1: <think> -> reasoning_content
        self.created = int(time.time())
        # tokenizing a long prompt takes seconds: never on the event loop, which would stall every other client
        self.tokenizing = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="wde-tokenize")

    async def off_loop(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, function, *args)

    async def prompt_ids(self, engine: ServedEngine, text: str, field: str = "prompt",
                         add_special_tokens: bool = True) -> list[int]:
        """A prompt's ids, cut one past the model's context: a longer prompt is refused whatever its length, and
        a megabyte prompt must not turn into millions of Python ints (built under the GIL, which would stall
        the event loop)."""
        refuse_if_surely_too_long(engine, text, field)
        return await self.off_loop(engine.tokenizer.encode, text, add_special_tokens, engine.max_model_len + 1)

    # --- plumbing -------------------------------------------------------------------------------------------

    async def read(self, request: Request, model_class):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise APIError(413, f"the request body is over {self.max_body_bytes} bytes", code="request_too_large")
        body = bytearray()
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > self.max_body_bytes:
                        raise APIError(413, f"the request body is over {self.max_body_bytes} bytes",
                                       code="request_too_large")
        except ClientDisconnect:  # it hung up while sending: an expected end, nobody to answer
            raise ClientDisconnected from None
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
                           code="request_timeout") from None
        try:
            data = parse_json(body)
        except ValueError as e:  # UnicodeDecodeError (bytes that are not UTF-8) included
            if "integer string conversion" in str(e):  # Python's cap on a number's digits, not a JSON error
                raise APIError(400, "the request body holds a number of more than 4,300 digits") from e
            raise APIError(400, f"the request body is not valid JSON: {e}") from e
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return model_class.model_validate(data)
        except ValidationError as e:
            raise from_validation_error(e) from e
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None

    def engine(self, name: str, *tasks: str) -> ServedEngine:
        if name not in self.engines:
            raise APIError(404, f"the model {name!r} does not exist; served: {', '.join(self.engines)}", param="model",
                           code="model_not_found")
        engine = self.engines[name]
        if engine.task not in tasks:
            raise APIError(400, f"the model {name!r} is served for {engine.task!r}, not for this "
                                f"endpoint ({' or '.join(tasks)})", param="model")
        if not engine.alive:
            raise APIError(503, f"the engine of {name!r} stopped: {engine.failure}", type="server_error")
        return engine

    async def submit(self, engine: ServedEngine, prompts: list, params, names: list[str] | None = None
                     ) -> "Submitted":
        """Add one request per prompt (all or none: a refused one aborts those already added). A refusal names
        the prompt as `names` does (default: "input i" when there are several). A text (the engine tokenizes
        those of embeddings, rerank, score and classify) that cannot fit is refused here, untokenized."""
        refuse_texts_surely_too_long(engine, prompts, names, "input")
        request_ids = [uuid.uuid4().hex for _ in prompts]
        try:
            outputs = await engine.add_requests([(request_id, prompt, params)
                                                 for request_id, prompt in zip(request_ids, prompts)])
        except Refused as refused:  # none of them runs
            if not isinstance(refused.error, (ValueError, TypeError)):
                raise refused.error from None
            index = refused.index
            which = names[index] if names else f"input {index}" if len(prompts) > 1 else ""
            raise APIError(400, f"{which}: {refused.error}" if which else str(refused.error)) from refused.error
        except EngineStopped as e:
            raise APIError(503, f"the engine of {engine.name!r} stopped: {e}", type="server_error") from None
        except BaseException:  # the client went away while they were being added: none of them runs
            engine.abort(request_ids)
            raise
        return Submitted(request_ids, outputs)

    async def finals(self, request: Request, engine: ServedEngine, submitted: "Submitted") -> list:
        """Each request's finished output, in the order submitted; the requests are aborted if the client goes
        away first."""
        results = [None] * len(submitted.request_ids)
        remaining = set(submitted.request_ids)
        try:
            while remaining:
                taken = await submitted.outputs.take_all(POLL_S)
                if not taken and await request.is_disconnected():
                    raise ClientDisconnected
                for output in taken:
                    if isinstance(output, Exception):
                        raise APIError(503, f"the engine of {engine.name!r} stopped: {output}", type="server_error")
                    if output.finished:
                        results[submitted.index[output.request_id]] = output
                        remaining.discard(output.request_id)
        except (ClientDisconnected, asyncio.CancelledError):
            engine.abort(list(remaining))
            raise
        for output in results:
            if output.error:
                raise output_error(output)
        return results

    async def merged(self, engine: ServedEngine, submitted: "Submitted") -> AsyncIterator:
        """(prompt index, output) of every request as outputs come; what a slow client has not read yet is
        joined into one output per request (fewer, larger events: the stream's back-pressure). Aborts what is
        unfinished if the stream is closed early (the client disconnected)."""
        remaining = set(submitted.request_ids)
        try:
            while remaining:
                for output in coalesce(await submitted.outputs.take_all()):
                    if isinstance(output, Exception):
                        raise output
                    yield submitted.index[output.request_id], output
                    if output.finished:
                        remaining.discard(output.request_id)
        finally:
            if remaining:
                engine.abort(list(remaining))
                logger.info("a stream closed before its end (the client went away, or a request failed); %d "
                            "unfinished requests aborted", len(remaining))

    def check_length(self, engine: ServedEngine, prompt_ids: list[int], max_tokens: int | None,
                     prompt_field: str) -> None:
        limit = engine.max_model_len
        wanted = len(prompt_ids) + (max_tokens or 1)
        if len(prompt_ids) > limit:  # cut at limit + 1 by tokenize(): its true length is not known
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, the prompt "
                                f"alone is longer than that.", param=prompt_field, code="context_length_exceeded")
        if len(prompt_ids) >= limit or wanted > limit:
            # the field to change: the prompt when it alone is too long, else max_tokens
            field = prompt_field if len(prompt_ids) >= limit or max_tokens is None else "max_tokens"
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{wanted} tokens ({len(prompt_ids)} in the prompt, {max_tokens or 1} for the "
                                "completion).", param=field, code="context_length_exceeded")

    @staticmethod
    def sse(stream: AsyncIterator[dict]) -> StreamingResponse:
        async def events():
            try:
                async for chunk in stream:
                    yield sse_event(chunk)
            except EngineStopped as e:  # the status line went out already: the error is the last event
                error = APIError(503, f"the engine stopped: {e}", type="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    # --- endpoints ------------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        stopped = {name: engine.failure or "stopped" for name, engine in self.engines.items() if not engine.alive}
        replicas = {f"{name}/{index}": reason for name, engine in self.engines.items()
                    for index, reason in engine.stopped_replicas().items()}
        if stopped:  # each stopped engine with the reason (a process killed by a signal, a step that failed)
            return JSONResponse({"status": "error", "stopped": stopped, "stopped_replicas": replicas},
                                status_code=503)
        if replicas:  # a data-parallel model still served by its other replicas
            return JSONResponse({"status": "degraded", "stopped_replicas": replicas})
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        stats = {}
        for name, engine in self.engines.items():
            try:
                stats[name] = await asyncio.wait_for(engine.stats(), STATS_TIMEOUT_S)
            except EngineStopped:
                pass  # a stopped engine shows only its latencies (and /health says it stopped)
            except asyncio.TimeoutError:  # inside a long step (or stopped by a signal): answer without it
                logger.warning("engine %s did not answer for its stats within %.0f s", name, STATS_TIMEOUT_S)
        return PlainTextResponse(metrics.render(self.engines, stats),
                                 media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "wde",
             "max_model_len": engine.max_model_len, "task": engine.task}
            for name, engine in self.engines.items()]})

    async def completions(self, request: Request) -> Response:
        body = await self.read(request, CompletionRequest)
        engine = self.engine(body.model, "generate")
        texts = body.prompts()
        prompts = [p if isinstance(p, list) else await self.prompt_ids(engine, p) for p in texts]
        for prompt in prompts:
            self.check_length(engine, prompt, body.max_tokens, "prompt")
        params = body.completion_params()  # a refused value: 400 (invalid_params)
        submitted = await self.submit(engine, prompts, params,
                                      [f"prompt.{i}" for i in range(len(prompts))] if len(prompts) > 1 else None)
        head = {"id": f"cmpl-{submitted.request_ids[0]}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        echo = Echo(engine.tokenizer, texts, prompts, body.logprobs) if body.echo else None
        prompt_tokens = sum(map(len, prompts))
        if body.stream:
            return self.sse(self._stream_completion(engine, submitted, head, body, prompt_tokens, echo))
        outputs = await self.finals(request, engine, submitted)
        choices = [completion_choice(i * body.n + c.index, c, body.logprobs, echo and echo.of(i, output))
                   for i, output in enumerate(outputs) for c in output.outputs]
        return JSONResponse({**head, "choices": choices, "usage": usage(prompt_tokens, generated_tokens(outputs))})

    async def _stream_completion(self, engine, submitted, head, body, prompt_tokens, echo) -> AsyncIterator[dict]:
        generated, echoed = 0, set()
        async for index, output in self.merged(engine, submitted):
            if output.error:  # the status line went out already: the error is the stream's last event
                yield output_error(output).body()
                return
            for c in output.outputs:
                generated += len(c.token_ids)
                choice = index * body.n + c.index
                prefix = echo.of(index, output) if echo and choice not in echoed else None
                if c.text or c.token_ids or c.finish_reason or prefix:
                    echoed.add(choice)
                    yield {**head, "choices": [completion_choice(choice, c, body.logprobs, prefix)]}
        if body.stream_options and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": usage(prompt_tokens, generated)}

    async def chat_completions(self, request: Request) -> Response:
        body = await self.read(request, ChatCompletionRequest)
        engine = self.engine(body.model, "generate")
        try:
            text = await self.off_loop(engine.tokenizer.apply_chat_template, [m.for_template() for m in body.messages],
                                       True, body.template_tools())
            # the template holds the special tokens: tokenizing must not add a second BOS
            prompt = await self.prompt_ids(engine, text, "messages", add_special_tokens=False)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="messages") from e
        max_tokens = body.max_completion_tokens or body.max_tokens
        self.check_length(engine, prompt, max_tokens, "messages")
        params = body.sampling_params(max_tokens, body.token_logprobs())
        submitted = await self.submit(engine, [prompt], params)
        head = {"id": f"chatcmpl-{submitted.request_ids[0]}", "created": int(time.time()), "model": body.model}
        if body.stream:
            return self.sse(self._stream_chat(engine, submitted, head, body, len(prompt)))
        [output] = await self.finals(request, engine, submitted)
        choices = []
        for c in output.outputs:
            message, finish_reason = self.assistant_message(body, c.text, c.finish_reason)
            choices.append({"index": c.index, "message": message, "finish_reason": finish_reason,
                            "logprobs": chat_logprobs(c, body)})
        return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                             "usage": usage(len(prompt), generated_tokens([output]))})

    def assistant_message(self, body: ChatCompletionRequest, text: str, finish_reason: str | None,
                          reasoning_done: bool = False) -> tuple[dict, str | None]:
        """The answer as OpenAI's assistant message, with its reasoning split off (unless `reasoning_done`: a
        stream gave it out already) and the tool calls read out of it when tools may be called (finish_reason
        then "tool_calls")."""
        reasoning = None
        if self.splits_reasoning and not reasoning_done:
            reasoning, text = split_reasoning(text)
        content, calls = text, []
        if body.forces_tool_calls() and finish_reason == "stop":
            content, calls = None, forced_calls(text)
        elif body.calls_tools():
            content, calls = self.tool_call_parser(text)
        message = {"role": "assistant", "content": content if calls else text}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if not calls:
            return message, finish_reason
        # calls read out of an answer cut by max_tokens: the answer still says it was cut
        return {**message, "tool_calls": calls}, "tool_calls" if finish_reason == "stop" else finish_reason

    async def _stream_chat(self, engine, submitted, head, body, prompt_tokens) -> AsyncIterator[dict]:
        head = {**head, "object": "chat.completion.chunk"}
        for index in range(body.n):
            yield {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None, "logprobs": None}]}
        generated = 0
        # with tools, an answer's content goes out whole at its end: only then is it known whether it holds calls
        held = {index: "" for index in range(body.n)} if body.calls_tools() else None
        splitters = {index: ReasoningSplitter() for index in range(body.n)} if self.splits_reasoning else None
        async for _, output in self.merged(engine, submitted):
            if output.error:
                yield output_error(output).body()
                return
            for c in output.outputs:
                generated += len(c.token_ids)
                delta = streamed_delta(c, splitters and splitters[c.index])
                if held is not None:
                    held[c.index] += delta.pop("content")
                if delta.get("content") or delta.get("reasoning_content") or (c.token_ids and held is None):
                    yield {**head, "choices": [{"index": c.index, "delta": delta,
                                                "finish_reason": None, "logprobs": chat_logprobs(c, body)}]}
                if not c.finish_reason:
                    continue
                finish_reason = c.finish_reason
                if held is not None:
                    message, finish_reason = self.assistant_message(body, held[c.index], c.finish_reason,
                                                                    reasoning_done=True)
                    delta = {key: value for key, value in message.items() if key != "role"}
                    for position, call in enumerate(delta.get("tool_calls", [])):
                        call["index"] = position
                    yield {**head, "choices": [{"index": c.index, "delta": delta, "finish_reason": None,
                                                "logprobs": None}]}
                yield {**head, "choices": [{"index": c.index, "delta": {}, "finish_reason": finish_reason,
                                            "logprobs": None}]}
        if body.stream_options and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": usage(prompt_tokens, generated)}

    async def embeddings(self, request: Request) -> Response:
        body = await self.read(request, EmbeddingRequest)
        engine = self.engine(body.model, "embed")
        inputs = body.inputs()
        outputs = await self.finals(request, engine, await self.submit(
            engine, inputs, PoolingParams(dimensions=body.dimensions),
            [f"input {i}" for i in range(len(inputs))] if len(inputs) > 1 else None))
        tokens = sum(len(o.prompt_token_ids) for o in outputs)

        def response_body() -> bytes:  # 2,048 vectors of 4,096 floats: ~80 MB of JSON, made off the event loop
            data = [{"object": "embedding", "index": i,
                     "embedding": encode_vector(o.outputs.data, body.encoding_format)} for i, o in enumerate(outputs)]
            return msgspec.json.encode({"object": "list", "data": data, "model": body.model,
                                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        return Response(await self.off_loop(response_body), media_type="application/json")

    async def pair_scores(self, request: Request, engine: ServedEngine, pairs: list[tuple[str, str]],
                          names: list[tuple[str, str]]) -> tuple[list[float], int]:
        """The score of each (first, second) pair and the tokens read: a scoring model reads each pair; an
        embedding model compares the two texts' vectors (cosine similarity), each distinct text embedded once.
        `names` say, for a refused text, which field it was."""
        if engine.task == "score":
            outputs = await self.finals(request, engine, await self.submit(
                engine, pairs, PoolingParams(), [second for _, second in names]))
            return [o.outputs.score for o in outputs], sum(len(o.prompt_token_ids) for o in outputs)
        texts = {}  # each text once, named by where it first appears
        for pair, pair_names in zip(pairs, names):
            for text, name in zip(pair, pair_names):
                texts.setdefault(text, name)
        outputs = await self.finals(request, engine, await self.submit(
            engine, list(texts), PoolingParams(normalize=True), list(texts.values())))
        vectors = {text: output.outputs.data for text, output in zip(texts, outputs)}
        return ([float(vectors[first] @ vectors[second]) for first, second in pairs],
                sum(len(o.prompt_token_ids) for o in outputs))

    async def rerank(self, request: Request) -> Response:
        """Cohere / Jina rerank: the documents by their score against the query."""
        body = await self.read(request, RerankRequest)
        engine = self.engine(body.model, "score", "embed")
        documents = body.texts()
        scores, tokens = await self.pair_scores(request, engine, [(body.query, d) for d in documents],
                                                [("query", f"documents.{i}") for i in range(len(documents))])
        ranked = sorted(range(len(documents)), key=lambda i: -scores[i])[:body.top_n]
        results = [{"index": i, "relevance_score": scores[i],
                    **({"document": {"text": documents[i]}} if body.return_documents else {})} for i in ranked]
        return JSONResponse({"id": f"rerank-{uuid.uuid4().hex}", "model": body.model, "results": results,
                             "usage": {"total_tokens": tokens}})

    async def score(self, request: Request) -> Response:
        """vLLM's /v1/score: each text_2 scored against text_1 (or pair by pair)."""
        body = await self.read(request, ScoreRequest)
        engine = self.engine(body.model, "score", "embed")
        pairs = body.pairs()
        one_first = isinstance(body.text_1, str) or len(body.text_1) == 1
        names = [("text_1" if one_first else f"text_1.{i}", f"text_2.{i}") for i in range(len(pairs))]
        scores, tokens = await self.pair_scores(request, engine, pairs, names)
        return JSONResponse({"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                             "model": body.model,
                             "data": [{"index": i, "object": "score", "score": v} for i, v in enumerate(scores)],
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def classify(self, request: Request) -> Response:
        """vLLM's /v1/classify: each input's class probabilities and its most likely class's label."""
        body = await self.read(request, ClassificationRequest)
        engine = self.engine(body.model, "classify")
        inputs = body.inputs()
        outputs = await self.finals(request, engine, await self.submit(
            engine, inputs, PoolingParams(), [f"input.{i}" for i in range(len(inputs))] if len(inputs) > 1 else None))
        labels = engine.info.labels
        data = []
        for i, output in enumerate(outputs):
            probs = output.outputs.data
            best = int(probs.argmax())
            data.append({"index": i, "label": labels[best] if labels and best < len(labels) else str(best),
                         "probs": probs.tolist(), "num_classes": probs.shape[0]})
        tokens = sum(len(o.prompt_token_ids) for o in outputs)
        return JSONResponse({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                             "model": body.model, "data": data,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def tokenize(self, request: Request) -> Response:
        """vLLM's /tokenize: a prompt's token ids (or a conversation's, through the chat template)."""
        body = await self.read(request, TokenizeRequest)
        engine = self.engine(body.model, "generate", "embed", "score", "classify")
        tokenizer = engine.tokenizer
        try:
            if body.messages is not None:
                text = tokenizer.apply_chat_template([m.for_template() for m in body.messages],
                                                     add_generation_prompt=body.add_generation_prompt)
                ids = await self.off_loop(tokenizer.encode, text, False)
            else:
                ids = await self.off_loop(tokenizer.encode, body.prompt, body.add_special_tokens)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="messages" if body.messages is not None else "prompt") from e
        answer = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
        if body.return_token_strs:
            answer["token_strs"] = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        return JSONResponse(answer)

    async def detokenize(self, request: Request) -> Response:
        body = await self.read(request, DetokenizeRequest)
        engine = self.engine(body.model, "generate", "embed", "score", "classify")
        vocabulary = len(engine.tokenizer)
        outside = next((t for t in body.tokens if not 0 <= t < vocabulary), None)
        if outside is not None:
            raise APIError(400, f"token id {outside} is outside the vocabulary (0 to {vocabulary - 1})",
                           param="tokens")
        text = await self.off_loop(engine.tokenizer.decode, body.tokens, False)
        return JSONResponse({"prompt": text})


def sse_event(chunk: dict) -> bytes:
    """One server-sent event. msgspec's encoder: 2-3x json's speed, and a stream sends thousands of events;
    json's (ASCII escapes) for text UTF-8 cannot encode, which an error message may quote."""
    try:
        return b"data: " + msgspec.json.encode(chunk) + b"\n\n"
    except UnicodeEncodeError:
        return f"data: {json.dumps(chunk)}\n\n".encode()


def parse_json(body: bytes) -> Any:
    """The body's JSON: msgspec's parser (4-5x faster than json's: 5 against 22 ms for 8 MB, time the event loop
    answers nobody else), and json's for what msgspec refuses, to keep json's semantics and messages (a lone
    surrogate escape, 1e999, and the error of malformed JSON)."""
    try:
        return msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return json.loads(body)


@dataclass
class Submitted:
    """The requests of one HTTP request, in order, and the box their outputs come to."""

    request_ids: list[str]
    outputs: Outputs
    index: dict[str, int] = field(init=False)

    def __post_init__(self):
        self.index = {request_id: i for i, request_id in enumerate(self.request_ids)}


def refuse_if_surely_too_long(engine: ServedEngine, text: str, field: str) -> None:
    """A 400 for a text its length alone proves too long for the model (no token stands for more characters
    than the vocabulary's longest entry), before any time goes into tokenizing it."""
    longest = engine.tokenizer.max_token_chars
    if longest and len(text) > NORMALIZATION_SLACK * longest * (engine.max_model_len + 1):
        raise APIError(400, f"This model's maximum context length is {engine.max_model_len} tokens. However, "
                            f"{field} alone is longer than that ({len(text)} characters).", param=field,
                       code="context_length_exceeded")


def refuse_texts_surely_too_long(engine: ServedEngine, texts: list, names: list[str] | None, field: str) -> None:
    for i, text in enumerate(texts):
        for part in (text if isinstance(text, tuple) else (text,)):
            if isinstance(part, str):
                refuse_if_surely_too_long(engine, part, names[i] if names else field)


class ClientDisconnected(Exception):
    """The client of a non-streaming request went away before its answer was ready."""


def output_error(output) -> APIError:
    """A failed request's error: the client's (400) unless the engine says the fault was its own (500)."""
    if output.internal_error:
        return APIError(500, output.error, type="server_error")
    return APIError(400, output.error, code="context_length_exceeded" if "max_model_len" in output.error else None)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def generated_tokens(outputs: list) -> int:
    return sum(len(c.token_ids) for o in outputs for c in o.outputs)


LogprobStep = tuple[str, float | None, dict[str, float] | None]  # a token's text, logprob, top alternatives


def logprob_step(chosen, entry: dict, k: int) -> LogprobStep:
    return (chosen.decoded_token or "", chosen.logprob,
            {lp.decoded_token: lp.logprob for lp in entry.values() if lp.rank <= k})


def completion_choice(index: int, completion, k: int | None,
                      echo: tuple[str, list[LogprobStep] | None] | None = None) -> dict:
    """A choice of /v1/completions (or its streamed delta); `echo`, the prompt's text and logprob steps, goes
    before it."""
    text, steps = completion.text, None
    if k is not None and completion.logprobs is not None:
        steps = [logprob_step(entry[token], entry, k) for token, entry in zip(completion.token_ids,
                                                                            completion.logprobs)]
    if echo is not None:
        text = echo[0] + text
        steps = echo[1] + (steps or []) if echo[1] is not None else steps
    return {"index": index, "text": text, "finish_reason": completion.finish_reason,
            "logprobs": legacy_logprobs(steps) if steps is not None else None}


def legacy_logprobs(steps: list[LogprobStep]) -> dict:
    """The completions API's logprobs: parallel lists, with each token's offset in the choice's text."""
    offsets, position = [], 0
    for token, _, _ in steps:
        offsets.append(position)
        position += len(token)
    return {"tokens": [s[0] for s in steps], "token_logprobs": [s[1] for s in steps],
            "top_logprobs": [s[2] for s in steps], "text_offset": offsets}


class Echo:
    """completions' echo: each prompt's text before its choices, and with logprobs the prompt tokens'
    log-probabilities before the completion's (the first token has none: nothing comes before it)."""

    def __init__(self, tokenizer, texts: list, prompts: list[list[int]], k: int | None):
        self.tokenizer, self.texts, self.prompts, self.k = tokenizer, texts, prompts, k
        self.made: dict[int, tuple[str, list[LogprobStep] | None]] = {}

    def of(self, index: int, output) -> tuple[str, list[LogprobStep] | None]:
        """Prompt `index`'s echo, made from the first output that carries its prompt logprobs."""
        if index not in self.made:
            ids, text = self.prompts[index], self.texts[index]
            if not isinstance(text, str):
                text = self.tokenizer.decode(ids, skip_special_tokens=False)
            steps = None
            if self.k is not None and output.prompt_logprobs is not None:
                first = (self.tokenizer.decode(ids[:1], skip_special_tokens=False), None, None)
                steps = [first] + [logprob_step(entry[token], entry, self.k)
                                   for token, entry in zip(ids[1:], output.prompt_logprobs[1:])]
            self.made[index] = (text, steps)
        return self.made[index]


def streamed_delta(completion, splitter: ReasoningSplitter | None) -> dict:
    """A chat stream's delta of a completion's new text, its reasoning split off when the server splits it."""
    if splitter is None:
        return {"content": completion.text}
    reasoning, content = splitter.feed(completion.text)
    if completion.finish_reason:
        rest_reasoning, rest_content = splitter.finish()
        reasoning, content = reasoning + rest_reasoning, content + rest_content
    return {"content": content, **({"reasoning_content": reasoning} if reasoning else {})}


def chat_logprobs(completion, body: ChatCompletionRequest) -> dict | None:
    if not body.logprobs or completion.logprobs is None:
        return None
    k = body.top_logprobs or 0

    def item(lp) -> dict:
        token = lp.decoded_token or ""
        return {"token": token, "logprob": lp.logprob, "bytes": list(token.encode())}
    return {"content": [{**item(entry[token]),
                         "top_logprobs": [item(lp) for lp in sorted(entry.values(), key=lambda x: x.rank)
                                          if lp.rank <= k]}
                        for token, entry in zip(completion.token_ids, completion.logprobs)]}


def encode_vector(vector, encoding_format: str) -> Any:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector.tolist()


class BearerAuth:
    """ASGI middleware: with an API key, every request but health probes needs `Authorization: Bearer <key>`.

    The header is compared as bytes (it may hold any bytes, not only UTF-8), in constant time, so its
    timing tells nothing about how much of the key it matched."""

    OPEN_PATHS = frozenset({"/health"})  # load balancers and orchestrators probe without a key

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.expected is not None and scope["path"] not in self.OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = APIError(401, "a valid API key is needed: Authorization: Bearer <key>",
                                    code="invalid_api_key").response()
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


async def api_error(request: Request, error: APIError) -> Response:
    return error.response()


async def client_disconnected(request: Request, error: ClientDisconnected) -> Response:
    """An expected end: the client went away, its requests were aborted. Nobody reads the answer."""
    logger.info("client %s disconnected from %s; its requests were aborted", request.client, request.url.path)
    return Response(status_code=499)


async def invalid_params(request: Request, error: ValidationError) -> Response:
    """Params built from what the client sent (SamplingParams, PoolingParams) that refuse a value: a 400."""
    return from_validation_error(error).response()


async def internal_error(request: Request, error: Exception) -> Response:
    """A fault of ours (never a client's mistake: those are 4xx): OpenAI's shape, no traceback to the client."""
    logger.error("internal error on %s", request.url.path, exc_info=error)
    return APIError(500, f"internal server error: {type(error).__name__}", type="server_error").response()


async def http_error(request: Request, error) -> Response:
    messages = {404: "no such endpoint", 405: "method not allowed for this endpoint"}
    return APIError(error.status_code, messages.get(error.status_code, str(error.detail))).response()


# each POST endpoint: the Server method that answers it and the model of its body (also /openapi.json's)
POST_ENDPOINTS = {"/v1/completions": ("completions", CompletionRequest),
                  "/v1/chat/completions": ("chat_completions", ChatCompletionRequest),
                  "/v1/embeddings": ("embeddings", EmbeddingRequest), "/v1/rerank": ("rerank", RerankRequest),
                  "/v1/score": ("score", ScoreRequest), "/v1/classify": ("classify", ClassificationRequest),
                  "/tokenize": ("tokenize", TokenizeRequest), "/detokenize": ("detokenize", DetokenizeRequest)}
GET_ENDPOINTS = {"/health": "health", "/metrics": "metrics", "/v1/models": "models"}


def openapi_document() -> dict:
    """An OpenAPI 3.1 document of the endpoints, each POST's body as its pydantic model's JSON schema: what
    clients' code generators and API fuzzers (schemathesis) read."""
    schemas, paths = {}, {}
    errors = {"description": "a client's mistake, in OpenAI's error shape: {\"error\": {\"message\", ...}}"}
    for path, (_, model) in POST_ENDPOINTS.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        body = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        paths[path] = {"post": {"requestBody": body, "responses": {"200": {"description": "the answer"},
                                                                   "4XX": errors}}}
    for path in GET_ENDPOINTS:
        paths[path] = {"get": {"responses": {"200": {"description": "the answer"}}}}
    return {"openapi": "3.1.0", "info": {"title": "wde", "version": "0.1.0"}, "paths": paths,
            "components": {"schemas": schemas}}


def build_app(engines: dict[str, ServedEngine], api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, tool_call_parser: str = "hermes",
              reasoning_parser: str | None = None) -> Starlette:
    server = Server(engines, api_key, max_body_bytes, tool_call_parser, reasoning_parser)
    document = openapi_document()

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)
    routes = [Route(path, getattr(server, name)) for path, name in GET_ENDPOINTS.items()]
    routes += [Route(path, getattr(server, name), methods=["POST"]) for path, (name, _) in POST_ENDPOINTS.items()]
    routes.append(Route("/openapi.json", openapi))
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    app = Starlette(routes=routes, middleware=[Middleware(BearerAuth, api_key=api_key)],
                    exception_handlers={APIError: api_error, HTTPException: http_error,
                                        ClientDisconnected: client_disconnected, ValidationError: invalid_params,
                                        Exception: internal_error})
    app.state.server = server
    return app
