"""The OpenAI-compatible server, started for real on 127.0.0.1 and used through the official openai client and
httpx: completions, chat (streamed and not), embeddings, rerank, health, metrics, API keys, 64 concurrent
streaming clients with some disconnecting, and a table of bad inputs with the error each gets."""
import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

from wde import LLM
from wde.core.config import default_embed_model_path
from wde.core.llm_engine import LLMEngine
from wde.entrypoints.openai.api_server import build_app
from wde.entrypoints.openai.async_engine import AsyncEngine

MAX_BODY = 64 * 1024


def serve(engines: dict, api_key: str | None = None):
    """Start a server in a thread; yield its base URL; stop it and its engines."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(engines, api_key, MAX_BODY), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        for engine in engines.values():
            engine.stop()


@pytest.fixture(scope="module")
def url():
    engines = {"smollm2": AsyncEngine(LLMEngine.from_engine_args(num_kv_blocks=128, max_model_len=256,
                                                                 disable_log_stats=True), "smollm2"),
               "minilm": AsyncEngine(LLMEngine.from_engine_args(model=default_embed_model_path()), "minilm")}
    yield from serve(engines)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused")


def test_models_and_health(client, url):
    assert {m.id for m in client.models.list()} == {"smollm2", "minilm"}
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_completion(client):
    result = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8,
                                       temperature=0, logprobs=2)
    choice = result.choices[0]
    assert choice.text.startswith(" Paris") and choice.finish_reason == "length"
    assert result.usage.prompt_tokens == 5 and result.usage.completion_tokens == 8
    assert len(choice.logprobs.tokens) == 8 and all(len(top) >= 1 for top in choice.logprobs.top_logprobs)
    several = client.completions.create(model="smollm2", prompt=["Hello", "One two three"], max_tokens=4, n=2,
                                        temperature=0.8, seed=3)
    assert sorted(c.index for c in several.choices) == [0, 1, 2, 3]


def test_chat_streamed_equals_not_streamed(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    pieces = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(pieces)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content and "Paris" in streamed
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    with_logprobs = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=5,
                                                   temperature=0, logprobs=True, top_logprobs=3)
    content = with_logprobs.choices[0].logprobs.content
    assert len(content) == 5 and all(len(item.top_logprobs) == 3 for item in content)


def test_embeddings_match_the_engine(client):
    texts = ["A man is eating food.", "A man is eating a piece of bread."]
    served = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64 by default
    as_floats = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    direct = LLM(model=default_embed_model_path()).embed(texts)
    for a, b, c in zip(served.data, as_floats.data, direct):
        assert len(a.embedding) == 384
        assert torch.allclose(torch.tensor(a.embedding), c.outputs.data, atol=1e-6)
        assert torch.allclose(torch.tensor(b.embedding), c.outputs.data, atol=1e-6)


def test_rerank_metrics(url):
    answer = httpx.post(f"{url}/v1/rerank", json={
        "model": "minilm", "query": "What do people eat?", "top_n": 2,
        "documents": ["A man is eating food.", "The sky is blue.", {"text": "She cooks a meal."}]}).json()
    assert [r["index"] for r in answer["results"]] == [0, 2]
    assert answer["results"][0]["relevance_score"] > answer["results"][1]["relevance_score"]
    assert answer["results"][0]["document"] == {"text": "A man is eating food."}
    text = httpx.get(f"{url}/metrics").text
    for name in ("wde_requests_running", "wde_requests_waiting", "wde_kv_cache_usage_ratio",
                 "wde_generation_tokens_per_second", "wde_request_latency_seconds_count"):
        assert f'{name}{{model="smollm2"}}' in text
    count_line = 'wde_request_latency_seconds_count{model="smollm2"}'
    count = next(line for line in text.splitlines() if line.startswith(count_line))
    assert int(count.split()[-1]) > 0


BAD_INPUTS = [  # (what, path, body or raw bytes, status, in the message)
    ("malformed JSON", "/v1/completions", b'{"model": "smollm2", "prompt": ', 400, "not valid JSON"),
    ("not an object", "/v1/completions", b'["smollm2"]', 400, "must be a JSON object"),
    ("unknown field", "/v1/completions", {"model": "smollm2", "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("missing model", "/v1/completions", {"prompt": "x"}, 400, "model: Field required"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "'gpt-9' does not exist"),
    ("temperature too high", "/v1/completions", {"model": "smollm2", "prompt": "x", "temperature": 5}, 400,
     "temperature"),
    ("max_tokens 0", "/v1/completions", {"model": "smollm2", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("n 0", "/v1/completions", {"model": "smollm2", "prompt": "x", "n": 0}, 400, "n: Input should be greater"),
    ("top_p 0", "/v1/completions", {"model": "smollm2", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("logprobs 99", "/v1/completions", {"model": "smollm2", "prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("stream not a bool", "/v1/completions", {"model": "smollm2", "prompt": "x", "stream": "maybe"}, 400, "stream"),
    ("empty stop string", "/v1/completions", {"model": "smollm2", "prompt": "x", "stop": [""]}, 400,
     "stop strings must not be empty"),
    ("empty prompt", "/v1/completions", {"model": "smollm2", "prompt": ""}, 400, "the prompt is empty"),
    ("token id outside the vocabulary", "/v1/completions", {"model": "smollm2", "prompt": [1, 999999]}, 400,
     "outside the vocabulary"),
    ("prompt over the limit", "/v1/completions", {"model": "smollm2", "prompt": "word " * 400}, 400,
     "maximum context length is 256"),
    ("prompt + max_tokens over the limit", "/v1/completions",
     {"model": "smollm2", "prompt": "hello", "max_tokens": 300}, 400, "maximum context length is 256"),
    ("no messages", "/v1/chat/completions", {"model": "smollm2", "messages": []}, 400, "messages"),
    ("unknown role", "/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "robot", "content": "x"}]},
     400, "role"),
    ("embeddings from the chat model", "/v1/embeddings", {"model": "smollm2", "input": "x"}, 400,
     "served for 'generate'"),
    ("chat with the embedding model", "/v1/chat/completions",
     {"model": "minilm", "messages": [{"role": "user", "content": "x"}]}, 400, "served for 'embed'"),
    ("embedding dimensions too large", "/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 999}, 400,
     "dimensions=999 is more than the model's 384"),
    ("rerank without documents", "/v1/rerank", {"model": "minilm", "query": "q", "documents": []}, 400, "documents"),
    ("body too large", "/v1/completions", {"model": "smollm2", "prompt": "x" * (MAX_BODY + 10)}, 413,
     "over 65536 bytes"),
    ("unknown endpoint", "/v1/fine_tuning/jobs", {}, 404, "no such endpoint"),
]


@pytest.mark.parametrize("what,path,body,status,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(url, client, what, path, body, status, message):
    if isinstance(body, bytes):
        response = httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(f"{url}{path}", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] in ("invalid_request_error", "server_error")
    assert client.completions.create(model="smollm2", prompt="Hi", max_tokens=2).choices[0].text is not None


def test_wrong_method_is_405(url):
    response = httpx.get(f"{url}/v1/completions")
    assert response.status_code == 405 and "method not allowed" in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir) -> LLMEngine:
    return LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=256, disable_log_stats=True)


@pytest.fixture(scope="module")
def tiny_url(tiny_engine):
    yield from serve({"tiny": AsyncEngine(tiny_engine, "tiny")}, api_key="secret")


def test_api_key_is_required(tiny_url):
    assert httpx.get(f"{tiny_url}/health").status_code == 401
    denied = httpx.post(f"{tiny_url}/v1/completions", json={"model": "tiny", "prompt": "w5"},
                        headers={"Authorization": "Bearer wrong"})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=f"{tiny_url}/v1", api_key="secret")
    assert client.completions.create(model="tiny", prompt="w5 w6", max_tokens=3).usage.completion_tokens >= 1


def test_64_concurrent_streams_some_abandoned_and_every_block_freed(tiny_url, tiny_engine):
    async def stream(http: httpx.AsyncClient, i: int) -> tuple[int, str | None]:
        body = {"model": "tiny", "prompt": " ".join(f"w{2 + (i * 7 + j) % 500}" for j in range(5 + i % 20)),
                "max_tokens": 40, "temperature": 0, "stream": True}
        chunks, finish = 0, None
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunks += 1
                finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
                if i % 4 == 0 and chunks == 3:  # a quarter of the clients hang up mid-stream
                    return chunks, "gone"
        return chunks, finish

    async def run_all():
        headers = {"Authorization": "Bearer secret"}
        async with httpx.AsyncClient(base_url=tiny_url, headers=headers, timeout=120) as http:
            return await asyncio.gather(*(stream(http, i) for i in range(64)))
    results = asyncio.run(run_all())
    assert sum(1 for _, finish in results if finish == "gone") == 16
    completed = [(chunks, finish) for chunks, finish in results if finish != "gone"]
    assert len(completed) == 48 and all(finish in ("length", "stop") and chunks >= 1 for chunks, finish in completed)
    assert any(finish == "length" and chunks >= 40 for chunks, finish in completed)
    deadline = time.monotonic() + 15  # the abandoned streams' aborts reach the engine thread between steps
    while time.monotonic() < deadline and tiny_engine.has_unfinished_requests():
        time.sleep(0.1)
    assert not tiny_engine.has_unfinished_requests()
    manager = tiny_engine.kv_cache_manager
    assert manager.num_free_blocks == manager.num_blocks
