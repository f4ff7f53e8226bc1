"""Fuzzing every HTTP endpoint of `wde serve` with bodies generated from its own request models (their JSON
schemas, through hypothesis-jsonschema), the same bodies with one field replaced by anything, arbitrary JSON,
raw bytes, and arbitrary Authorization headers.

For every case: no 5xx; every 4xx is OpenAI's error shape with a message; a 200 is a JSON body, or a stream of
JSON events whose errors have that shape; /health stays ok. After the cases: both engines idle, every KV
block free."""
import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from tests.fuzz import Shared, any_value, count_case, fuzz_settings
from tests.served import serve
from wde.core.config import default_embed_model_path
from wde.core.engine.llm_engine import LLMEngine
from wde.entrypoints.openai.async_engine import AsyncEngine
from wde.entrypoints.openai.protocol import (ChatCompletionRequest, ClassificationRequest, CompletionRequest,
                                             DetokenizeRequest, EmbeddingRequest, RerankRequest, ScoreRequest,
                                             TokenizeRequest)

KEY = "secret"
# path -> (its request model, the model that serves it)
ENDPOINTS = {"/v1/completions": (CompletionRequest, "tiny"), "/v1/chat/completions": (ChatCompletionRequest, "tiny"),
             "/v1/embeddings": (EmbeddingRequest, "embed"), "/v1/rerank": (RerankRequest, "embed"),
             "/v1/score": (ScoreRequest, "embed"), "/v1/classify": (ClassificationRequest, "embed"),
             "/tokenize": (TokenizeRequest, "tiny"), "/detokenize": (DetokenizeRequest, "tiny")}
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}w3"


def bounded(schema: dict) -> dict:
    """The schema with short arrays and strings: cases explore shapes, not load."""
    if isinstance(schema, dict):
        schema = {key: bounded(value) for key, value in schema.items()}
        if schema.get("type") == "array":
            schema.setdefault("maxItems", 4)
        if schema.get("type") == "string":
            schema.setdefault("maxLength", 40)
        return schema
    return [bounded(item) for item in schema] if isinstance(schema, list) else schema


def bodies(path: str) -> st.SearchStrategy:
    model_class, served = ENDPOINTS[path]
    valid = from_schema(bounded(model_class.model_json_schema())).map(lambda body: {**body, "model": served})

    def mutate(body: dict, data) -> dict:
        field = data.draw(st.sampled_from(sorted(model_class.model_fields) + ["no_such_field"]))
        return {**body, field: data.draw(any_value)}
    mutated = st.tuples(valid, st.data()).map(lambda pair: mutate(*pair))
    other_model = valid.flatmap(lambda body: st.sampled_from(["nope", "tiny", "embed"]).map(
        lambda name: {**body, "model": name}))
    return st.one_of(valid, valid, valid, mutated, mutated, other_model, any_value)


endpoint_case = st.sampled_from(sorted(ENDPOINTS)).flatmap(
    lambda path: st.tuples(st.just("POST"), st.just(path), bodies(path)))
request_case = st.one_of(
    endpoint_case, endpoint_case, endpoint_case,
    st.tuples(st.sampled_from(["GET", "POST", "DELETE"]),
              st.sampled_from(["/health", "/metrics", "/v1/models", "/v1/completions", "/v1/nope", "/"]),
              st.one_of(st.none(), any_value)),
    st.tuples(st.just("POST"), st.sampled_from(sorted(ENDPOINTS)),
              st.one_of(st.binary(max_size=64), st.integers(1, 6000).map(lambda n: b"[" * n + b"]" * n))))
# what HTTP lets a header value hold (no control characters, no blank at either end): any other byte, UTF-8 or not
HEADER_BYTES = [b for b in range(0x20, 0x100) if b != 0x7F]
header_value = st.lists(st.sampled_from(HEADER_BYTES), max_size=24).map(lambda b: bytes(b).strip(b" "))
wrong_key = st.one_of(header_value, header_value.map(lambda b: (b"Bearer " + b).strip(b" ")))
# mostly the right key, so that most cases reach the endpoints
authorization = st.sampled_from(range(10)).flatmap(lambda i: wrong_key if i == 9 else st.just(f"Bearer {KEY}".encode()))


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    folder = Path(tmp_path_factory.mktemp("chat")) / "tiny"
    shutil.copytree(tiny_model_dir("qwen3"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    engines = {"tiny": LLMEngine.from_engine_args(model=str(folder), num_kv_blocks=64, max_model_len=128,
                                                  max_num_seqs=16, disable_log_stats=True),
               "embed": LLMEngine.from_engine_args(model=default_embed_model_path(), max_model_len=64,
                                                   disable_log_stats=True)}
    for url in serve({name: AsyncEngine(engine, name) for name, engine in engines.items()}, api_key=KEY):
        with httpx.Client(base_url=url, timeout=120) as client:
            yield Shared(client=client, engines=engines)
        assert_idle(engines)


def assert_idle(engines: dict) -> None:
    """Aborts of closed streams reach the engine threads between steps: give them a moment."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(e.has_unfinished_requests() for e in engines.values()):
        time.sleep(0.05)
    for name, engine in engines.items():
        manager = engine.kv_cache_manager
        assert not engine.has_unfinished_requests(), f"{name} still has requests"
        assert manager.num_free_blocks == manager.num_blocks, f"{name} holds KV blocks"


def assert_error_shape(payload, status: int) -> None:
    error = payload["error"]
    assert isinstance(error["message"], str) and error["message"].strip(), f"{status} without a message"
    assert error["type"] in ("invalid_request_error", "server_error") and {"param", "code"} <= set(error)


def send(client: httpx.Client, method: str, path: str, body, auth: bytes) -> None:
    headers = {"Authorization": auth, "content-type": "application/json"}
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    with client.stream(method, path, content=content, headers=headers) as response:
        raw = response.read()
        status, media = response.status_code, response.headers.get("content-type", "")
    event(f"{path} {status}")  # the spread of answers: --hypothesis-show-statistics shows it
    assert status < 500, f"{method} {path} -> {status}: {raw[:500]!r}"
    if status >= 400:
        return assert_error_shape(json.loads(raw), status)
    if media.startswith("text/event-stream"):
        events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", f"a stream that does not end with [DONE]: {raw[-200:]!r}"
        for chunk in map(json.loads, events[:-1]):
            assert isinstance(chunk, dict)
            if "error" in chunk:
                assert_error_shape(chunk, status)
    elif media.startswith("application/json"):
        json.loads(raw)


@fuzz_settings(ci_examples=300)
@given(case=request_case, auth=authorization)
def test_no_request_gets_a_5xx_and_every_error_has_openais_shape(server, case, auth):
    count_case("server: requests to every endpoint")
    send(server.client, *case, auth)
    assert server.client.get("/health").json() == {"status": "ok"}
