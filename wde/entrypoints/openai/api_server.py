"""The OpenAI-compatible server: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/rerank,
/health and /metrics, over one engine per served model.

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
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

import numpy as np
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from wde.core.pooling_params import PoolingParams
from wde.entrypoints.openai import metrics
from wde.entrypoints.openai.errors import APIError, from_validation_error
from wde.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, EmbeddingRequest,
                                             RerankRequest)
from wde.entrypoints.openai.served_engine import EngineStopped, Refused, ServedEngine

logger = logging.getLogger(__name__)
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
TOKENIZER_THREADS = 4  # the Rust tokenizer lets go of the GIL: prompts are tokenized side by side


class Server:
    def __init__(self, engines: dict[str, ServedEngine], api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.engines, self.api_key, self.max_body_bytes = engines, api_key, max_body_bytes
        self.created = int(time.time())
        # tokenizing a long prompt takes seconds: never on the event loop, which would stall every other client
        self.tokenizing = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="wde-tokenize")

    async def off_loop(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, function, *args)

    # --- plumbing -------------------------------------------------------------------------------------------

    async def read(self, request: Request, model_class):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise APIError(413, f"the request body is over {self.max_body_bytes} bytes", code="request_too_large")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.max_body_bytes:
                    raise APIError(413, f"the request body is over {self.max_body_bytes} bytes",
                                   code="request_too_large")
        except ClientDisconnect:  # it hung up while sending: an expected end, nobody to answer
            raise ClientDisconnected from None
        try:
            data = json.loads(body)
        except ValueError as e:  # UnicodeDecodeError (bytes that are not UTF-8) included
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
                     ) -> list[tuple[str, asyncio.Queue]]:
        """Add one request per prompt (all or none: a refused one aborts those already added). A refusal names
        the prompt as `names` does (default: "input i" when there are several)."""
        request_ids = [uuid.uuid4().hex for _ in prompts]
        try:
            queues = await engine.add_requests([(request_id, prompt, params)
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
        return list(zip(request_ids, queues))

    async def finals(self, request: Request, engine: ServedEngine, submitted: list[tuple[str, asyncio.Queue]]) -> list:
        """Each request's finished output; the requests are aborted if the client goes away first."""
        results = []
        try:
            for _, queue in submitted:
                while True:
                    try:
                        output = await asyncio.wait_for(queue.get(), POLL_S)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            raise ClientDisconnected from None
                        continue
                    if isinstance(output, Exception):
                        raise APIError(503, f"the engine of {engine.name!r} stopped: {output}", type="server_error")
                    if output.finished:
                        results.append(output)
                        break
        except (ClientDisconnected, asyncio.CancelledError):
            engine.abort([request_id for request_id, _ in submitted[len(results):]])
            raise
        for output in results:
            if output.error:
                raise output_error(output)
        return results

    async def merged(self, engine: ServedEngine, submitted: list[tuple[str, asyncio.Queue]]) -> AsyncIterator:
        """(prompt index, output) of every request as outputs come; aborts what is unfinished if the stream
        is closed early (the client disconnected)."""
        pending = {asyncio.ensure_future(queue.get()): index for index, (_, queue) in enumerate(submitted)}
        finished = set()
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    index = pending.pop(task)
                    output = task.result()
                    if isinstance(output, Exception):
                        raise output
                    yield index, output
                    if output.finished:
                        finished.add(index)
                    else:
                        pending[asyncio.ensure_future(submitted[index][1].get())] = index
        finally:
            for task in pending:
                task.cancel()
            unfinished = [request_id for index, (request_id, _) in enumerate(submitted) if index not in finished]
            if unfinished:
                engine.abort(unfinished)
                logger.info("a stream closed before its end (the client went away, or a request failed); %d "
                            "unfinished requests aborted", len(unfinished))

    def check_length(self, engine: ServedEngine, prompt_ids: list[int], max_tokens: int | None,
                     prompt_field: str) -> None:
        limit = engine.max_model_len
        wanted = len(prompt_ids) + (max_tokens or 1)
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
                    yield f"data: {json.dumps(chunk)}\n\n"
            except EngineStopped as e:  # the status line went out already: the error is the last event
                error = APIError(503, f"the engine stopped: {e}", type="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    # --- endpoints ------------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        stopped = {name: engine.failure or "stopped" for name, engine in self.engines.items() if not engine.alive}
        if stopped:  # each stopped engine with the reason (a process killed by a signal, a step that failed)
            return JSONResponse({"status": "error", "stopped": stopped}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        stats = {}
        for name, engine in self.engines.items():
            try:
                stats[name] = await engine.stats()
            except EngineStopped:
                pass  # a stopped engine shows only its latencies (and /health says it stopped)
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
        prompts = [p if isinstance(p, list) else await self.off_loop(engine.tokenizer.encode, p)
                   for p in body.prompts()]
        for prompt in prompts:
            self.check_length(engine, prompt, body.max_tokens, "prompt")
        params = body.sampling_params(body.max_tokens, body.logprobs)  # a refused value: 400 (invalid_params)
        submitted = await self.submit(engine, prompts, params,
                                      [f"prompt.{i}" for i in range(len(prompts))] if len(prompts) > 1 else None)
        head = {"id": f"cmpl-{submitted[0][0]}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        prompt_tokens = sum(map(len, prompts))
        if body.stream:
            return self.sse(self._stream_completion(engine, submitted, head, body, prompt_tokens))
        outputs = await self.finals(request, engine, submitted)
        choices = [{"index": i * body.n + c.index, "text": c.text, "finish_reason": c.finish_reason,
                    "logprobs": completion_logprobs(c, body.logprobs)}
                   for i, output in enumerate(outputs) for c in output.outputs]
        return JSONResponse({**head, "choices": choices, "usage": usage(prompt_tokens, generated_tokens(outputs))})

    async def _stream_completion(self, engine, submitted, head, body, prompt_tokens) -> AsyncIterator[dict]:
        generated = 0
        async for index, output in self.merged(engine, submitted):
            if output.error:  # the status line went out already: the error is the stream's last event
                yield output_error(output).body()
                return
            for c in output.outputs:
                generated += len(c.token_ids)
                if c.text or c.token_ids or c.finish_reason:
                    yield {**head, "choices": [{"index": index * body.n + c.index, "text": c.text,
                                                "finish_reason": c.finish_reason,
                                                "logprobs": completion_logprobs(c, body.logprobs)}]}
        if body.stream_options and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": usage(prompt_tokens, generated)}

    async def chat_completions(self, request: Request) -> Response:
        body = await self.read(request, ChatCompletionRequest)
        engine = self.engine(body.model, "generate")
        try:
            prompt = await self.off_loop(engine.tokenizer.encode_chat, [m.for_template() for m in body.messages])
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="messages") from e
        max_tokens = body.max_completion_tokens or body.max_tokens
        self.check_length(engine, prompt, max_tokens, "messages")
        params = body.sampling_params(max_tokens, body.token_logprobs())
        submitted = await self.submit(engine, [prompt], params)
        head = {"id": f"chatcmpl-{submitted[0][0]}", "created": int(time.time()), "model": body.model}
        if body.stream:
            return self.sse(self._stream_chat(engine, submitted, head, body, len(prompt)))
        [output] = await self.finals(request, engine, submitted)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason, "logprobs": chat_logprobs(c, body)} for c in output.outputs]
        return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                             "usage": usage(len(prompt), generated_tokens([output]))})

    async def _stream_chat(self, engine, submitted, head, body, prompt_tokens) -> AsyncIterator[dict]:
        head = {**head, "object": "chat.completion.chunk"}
        for index in range(body.n):
            yield {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None, "logprobs": None}]}
        generated = 0
        async for _, output in self.merged(engine, submitted):
            if output.error:
                yield output_error(output).body()
                return
            for c in output.outputs:
                generated += len(c.token_ids)
                if c.text or c.token_ids:
                    yield {**head, "choices": [{"index": c.index, "delta": {"content": c.text},
                                                "finish_reason": None, "logprobs": chat_logprobs(c, body)}]}
                if c.finish_reason:
                    yield {**head, "choices": [{"index": c.index, "delta": {}, "finish_reason": c.finish_reason,
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
        data = [{"object": "embedding", "index": i,
                 "embedding": encode_vector(o.outputs.data, body.encoding_format)} for i, o in enumerate(outputs)]
        tokens = sum(len(o.prompt_token_ids) for o in outputs)
        return JSONResponse({"object": "list", "data": data, "model": body.model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def rerank(self, request: Request) -> Response:
        """Cohere / Jina rerank: a scoring model reads each (query, document); an embedding model compares
        their vectors (cosine similarity)."""
        body = await self.read(request, RerankRequest)
        engine = self.engine(body.model, "score", "embed")
        documents = body.texts()
        if engine.task == "score":
            outputs = await self.finals(request, engine, await self.submit(
                engine, [(body.query, d) for d in documents], PoolingParams(),
                [f"documents.{i}" for i in range(len(documents))]))
            scores = [o.outputs.score for o in outputs]
        else:
            outputs = await self.finals(request, engine, await self.submit(
                engine, [body.query, *documents], PoolingParams(normalize=True),
                ["query"] + [f"documents.{i}" for i in range(len(documents))]))
            query = outputs[0].outputs.data
            scores = [float(query @ o.outputs.data) for o in outputs[1:]]
        ranked = sorted(range(len(documents)), key=lambda i: -scores[i])[:body.top_n]
        results = [{"index": i, "relevance_score": scores[i],
                    **({"document": {"text": documents[i]}} if body.return_documents else {})} for i in ranked]
        return JSONResponse({"id": f"rerank-{uuid.uuid4().hex}", "model": body.model, "results": results,
                             "usage": {"total_tokens": sum(len(o.prompt_token_ids) for o in outputs)}})


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


def completion_logprobs(completion, k: int | None) -> dict | None:
    if k is None or completion.logprobs is None:
        return None
    steps = list(zip(completion.token_ids, completion.logprobs))
    tokens = [entry[token].decoded_token for token, entry in steps]
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token or "")
    return {"tokens": tokens, "token_logprobs": [entry[token].logprob for token, entry in steps],
            "top_logprobs": [{lp.decoded_token: lp.logprob for lp in entry.values() if lp.rank <= k}
                             for _, entry in steps],
            "text_offset": offsets}


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


def build_app(engines: dict[str, ServedEngine], api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Starlette:
    server = Server(engines, api_key, max_body_bytes)
    routes = [Route("/health", server.health), Route("/metrics", server.metrics),
              Route("/v1/models", server.models),
              Route("/v1/completions", server.completions, methods=["POST"]),
              Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
              Route("/v1/embeddings", server.embeddings, methods=["POST"]),
              Route("/v1/rerank", server.rerank, methods=["POST"])]
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    app = Starlette(routes=routes, middleware=[Middleware(BearerAuth, api_key=api_key)],
                    exception_handlers={APIError: api_error, HTTPException: http_error,
                                        ClientDisconnected: client_disconnected, ValidationError: invalid_params,
                                        Exception: internal_error})
    app.state.server = server
    return app
