"""The OpenAI-compatible server, started for real on 127.0.0.1 and used through the official openai client and
httpx: completions, chat (streamed and not), embeddings, rerank, health, metrics, API keys, 64 concurrent
streaming clients with some disconnecting, and a table of bad inputs with the error each gets."""
import asyncio
import json
import re
import socket
import time

import httpx
import jsonschema
import openai
import pydantic
import pytest
import torch

from wde import LLM, SamplingParams
from wde.core.config import default_embed_model_path
from wde.core.engine.llm_engine import LLMEngine
from wde.entrypoints.openai.async_engine import AsyncEngine

from tests.served import MAX_BODY, serve


@pytest.fixture(scope="module")
def url(served_smollm2):
    return served_smollm2[0]


@pytest.fixture(autouse=True)
def engine_processes_idle_after_each_test(request, served_smollm2):
    """What conftest checks of in-process engines, for the engines in their own processes: every request
    finished or aborted, every KV block free (aborts reach the engine a moment after the test's last answer)."""
    yield
    if "url" in request.fixturenames:
        for engine in served_smollm2[1].values():
            assert wait_until_idle(engine), f"engine {engine.name} still holds requests or KV blocks"


def wait_until_idle(engine, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = asyncio.run(engine.stats())
        if stats.num_running == stats.num_waiting == stats.kv_blocks_used == 0:
            return True
        time.sleep(0.1)
    return False


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


@pytest.fixture(scope="module")
def batch_url():
    """A server whose engine records the requests it holds at each step."""
    engine = LLMEngine.from_engine_args(num_kv_blocks=128, max_model_len=64, max_num_seqs=64, disable_log_stats=True)
    held, step = [], engine.step

    def recording_step():
        held.append(len(engine.scheduler.requests))
        return step()
    engine.step = recording_step
    engines = {"smollm2": AsyncEngine(engine, "smollm2")}
    for url in serve(engines):
        yield url, held


def test_the_prompts_of_one_request_reach_the_engine_together(batch_url):
    """All 48 prompts are added between two steps (one per step made a 1,000-prompt request 7x slower than
    LLM.generate), and one refused prompt among them leaves none running."""
    url, held = batch_url
    prompts = [f"Count to {i}:" for i in range(48)]
    response = httpx.post(f"{url}/v1/completions", json={"model": "smollm2", "prompt": prompts, "max_tokens": 2,
                                                          "temperature": 0}, timeout=120)
    assert response.status_code == 200 and len(response.json()["choices"]) == 48
    assert held and held[0] == 48, f"requests held at the first steps: {held[:5]}"
    held.clear()
    refused = httpx.post(f"{url}/v1/completions", json={"model": "smollm2", "prompt": [[1, 2], [1, 999999], [3]],
                                                         "max_tokens": 2}, timeout=60)
    assert refused.status_code == 400 and "prompt.1" in refused.json()["error"]["message"]
    time.sleep(0.5)
    assert all(count == 0 for count in held)


def test_chat_content_as_text_parts_and_a_null_assistant_turn(client):
    """What many clients send: content as a list of text parts (joined by newlines, as vLLM joins them), and an
    assistant turn with content null; both reach the chat template as the plain-string conversation does."""
    as_parts = [{"role": "system", "content": [{"type": "text", "text": "You are brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                             {"type": "text", "text": "of France?"}]},
                {"role": "assistant", "content": None},
                {"role": "user", "content": "Answer in one word."}]
    as_strings = [{"role": "system", "content": "You are brief."},
                  {"role": "user", "content": "What is the capital\nof France?"},
                  {"role": "assistant", "content": ""},
                  {"role": "user", "content": "Answer in one word."}]
    parts = client.chat.completions.create(model="smollm2", messages=as_parts, max_tokens=8, temperature=0)
    strings = client.chat.completions.create(model="smollm2", messages=as_strings, max_tokens=8, temperature=0)
    assert parts.choices[0].message.content == strings.choices[0].message.content
    assert parts.usage.prompt_tokens == strings.usage.prompt_tokens


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
    httpx.post(f"{url}/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2}, timeout=60)
    text = httpx.get(f"{url}/metrics").text
    for name in ("wde_requests_running", "wde_requests_waiting", "wde_kv_cache_usage_ratio",
                 "wde_generation_tokens_per_second", "wde_request_latency_seconds_count", "wde_steps_total",
                 "wde_step_execute_seconds_total"):
        assert f'{name}{{model="smollm2"}}' in text
    count_line = 'wde_request_latency_seconds_count{model="smollm2"}'
    count = next(line for line in text.splitlines() if line.startswith(count_line))
    assert int(count.split()[-1]) > 0


def test_echo_with_logprobs_gives_the_prompts_logprobs_as_lm_eval_reads_them(url, reference):
    """lm-eval's loglikelihood request (token ids, echo, logprobs=1, max_tokens=1): the prompt's log-probabilities
    are the engine's, the first is null, the text is the prompt and its completion, streamed or not."""
    prompt = reference.engine.tokenizer.encode("The capital of France is Paris")
    body = {"model": "smollm2", "prompt": [prompt], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True,
            "seed": 1234}
    choice = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(prompt) + 1 and logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None and all(isinstance(t, dict) for t in logprobs["top_logprobs"][1:])
    assert choice["text"].startswith("The capital of France is Paris")
    assert "".join(logprobs["tokens"]) == choice["text"]
    expected = prompt_logprobs_of(reference, prompt)
    assert logprobs["token_logprobs"][1:-1] == pytest.approx(expected, abs=1e-4)
    # lm-eval's greedy check: each top-1 value equals the token's own when the token is the most likely one
    greedy = [lp == max(top.values()) for lp, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:])]
    assert greedy[-1]  # the generated token was chosen greedily
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    streamed = "".join(e["choices"][0]["text"] for e in events)
    assert streamed == choice["text"]
    assert events[0]["choices"][0]["logprobs"]["token_logprobs"] == logprobs["token_logprobs"]
    plain = httpx.post(f"{url}/v1/completions", json={"model": "smollm2", "prompt": "Hello", "max_tokens": 2,
                                                        "temperature": 0, "echo": True}).json()["choices"][0]
    assert plain["text"].startswith("Hello") and plain["logprobs"] is None


@pytest.fixture(scope="module")
def reference(smollm2_reference):
    return smollm2_reference


def prompt_logprobs_of(llm: LLM, prompt: list[int]) -> list[float]:
    """The prompt tokens' log-probabilities from the offline API, positions 1 on."""
    output = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1),
                          use_tqdm=False)[0]
    return [entry[token].logprob for token, entry in zip(prompt[1:], output.prompt_logprobs[1:])]


def test_openapi_document_describes_every_endpoint(url):
    """/openapi.json: each POST endpoint with its body's JSON schema, every reference resolving."""
    from wde.entrypoints.openai.api_server import POST_ENDPOINTS
    document = httpx.get(f"{url}/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert set(POST_ENDPOINTS) <= set(document["paths"]) and "/health" in document["paths"]
    completion = schemas["CompletionRequest"]
    assert {"prompt", "echo", "logprobs", "ignore_eos"} <= set(completion["properties"])
    assert completion["additionalProperties"] is False  # unknown fields are refused, as the server does
    references = re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(document))
    assert references and all(name in schemas for name in references)


def test_inputs_that_cannot_fit_or_too_many_are_refused_before_the_engine_sees_them(url):
    """A chat message, or a text the engine would tokenize (embeddings, score), that its length proves too long
    is refused untokenized, naming the field; so is a request of more than 2,048 completions or inputs."""
    text = "hello " * 15_000  # 90,000 characters: more than 4 x 81 x 257 (SmolLM2), 4 x 18 x 513 (MiniLM)
    refused = [httpx.post(f"{url}{path}", json=body, timeout=60) for path, body in [
        ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": text}]}),
        ("/v1/embeddings", {"model": "minilm", "input": ["fine", text]}),
        ("/v1/score", {"model": "minilm", "text_1": "q", "text_2": ["fine", text]})]]
    assert [r.status_code for r in refused] == [400] * 3
    assert [r.json()["error"]["param"] for r in refused] == ["messages", "input 1", "text_2.1"]
    assert all("alone is longer than that" in r.json()["error"]["message"] for r in refused)
    for path, body in [("/v1/completions", {"model": "smollm2", "prompt": [[5, 6]] * 1025, "n": 2}),
                       ("/v1/embeddings", {"model": "minilm", "input": ["a"] * 2049})]:
        answer = httpx.post(f"{url}{path}", json=body, timeout=60)
        assert answer.status_code == 400 and "2048" in answer.json()["error"]["message"]


def test_tokenize_and_detokenize(url, reference):
    tokenizer = reference.engine.tokenizer
    tokens = httpx.post(f"{url}/tokenize", json={"model": "smollm2", "prompt": "Hello world",
                                                 "return_token_strs": True}).json()
    assert tokens["tokens"] == tokenizer.encode("Hello world") and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == 256 and "".join(tokens["token_strs"]).endswith("Hello world")
    back = httpx.post(f"{url}/detokenize", json={"model": "smollm2", "tokens": tokens["tokens"]}).json()
    assert back["prompt"].endswith("Hello world")
    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(f"{url}/tokenize", json={"model": "smollm2", "messages": messages}).json()
    assert chat["tokens"] == tokenizer.encode_chat(messages)
    for body, status, words in [({"model": "smollm2", "tokens": [1, 10**9]}, 400, "outside the vocabulary"),
                                ({"model": "smollm2"}, 400, "either prompt or messages")]:
        path = "/detokenize" if "tokens" in body else "/tokenize"
        answer = httpx.post(f"{url}{path}", json=body)
        assert answer.status_code == status and words in answer.json()["error"]["message"]


def test_score_agrees_with_rerank(url):
    documents = ["A man is eating food.", "The sky is blue."]
    score = httpx.post(f"{url}/v1/score", json={"model": "minilm", "text_1": "What do people eat?",
                                                "text_2": documents}).json()
    rerank = httpx.post(f"{url}/v1/rerank", json={"model": "minilm", "query": "What do people eat?",
                                                  "documents": documents}).json()
    by_index = {r["index"]: r["relevance_score"] for r in rerank["results"]}
    assert [d["score"] for d in score["data"]] == pytest.approx([by_index[0], by_index[1]], abs=1e-6)
    pairwise = httpx.post(f"{url}/v1/score", json={"model": "minilm", "text_1": documents, "text_2": documents})
    assert [d["score"] for d in pairwise.json()["data"]] == pytest.approx([1.0, 1.0], abs=1e-5)
    mismatched = httpx.post(f"{url}/v1/score", json={"model": "minilm", "text_1": ["a", "b"], "text_2": ["a"] * 3})
    assert mismatched.status_code == 400 and "give one text_1" in mismatched.json()["error"]["message"]


def test_classify_matches_the_engine(tmp_path):
    from tests.encoder_models import write_encoder
    folder = str(write_encoder(tmp_path, "bert", num_labels=3))
    texts = ["a good day", "a bad day"]
    expected = LLM(model=folder, task="classify").classify(texts)
    engine = LLMEngine.from_engine_args(model=folder, task="classify", disable_log_stats=True)
    for url in serve({"classifier": AsyncEngine(engine, "classifier")}):
        answer = httpx.post(f"{url}/v1/classify", json={"model": "classifier", "input": texts}).json()
    for item, output in zip(answer["data"], expected):
        assert item["probs"] == pytest.approx(output.outputs.probs, abs=1e-6) and item["num_classes"] == 3
        assert item["label"] == f"LABEL_{int(output.outputs.data.argmax())}"
    assert answer["usage"]["prompt_tokens"] == sum(len(o.prompt_token_ids) for o in expected)


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
     f"over {MAX_BODY} bytes"),
    ("unknown endpoint", "/v1/fine_tuning/jobs", {}, 404, "no such endpoint"),
    # each of these was a 500 (or a 200 with nothing in it) before
    ("JSON nested 5,000 deep", "/v1/completions", b'{"model": "smollm2", "prompt": ' + b"[" * 5000 + b"]" * 5000
     + b"}", 400, "nested too deeply"),
    ("no prompt at all", "/v1/completions", {"model": "smollm2", "prompt": []}, 400, "must not be an empty list"),
    ("a lone surrogate in the prompt", "/v1/completions", b'{"model": "smollm2", "prompt": "a\\ud800"}', 400,
     "not valid Unicode: character 1 is '\\ud800'"),
    ("a lone surrogate in a stop string", "/v1/completions", b'{"model": "smollm2", "prompt": "a", "stop": '
     b'["\\udc00"]}', 400, "not valid Unicode"),
    ("a lone surrogate in chat content", "/v1/chat/completions",
     b'{"model": "smollm2", "messages": [{"role": "user", "content": "\\ud83d"}]}', 400, "not valid Unicode"),
    ("an image part in chat content", "/v1/chat/completions",
     {"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                     "image_url": {"url": "x"}}]}]},
     400, "content parts of type 'image_url' are not supported"),
    ("a user message with null content", "/v1/chat/completions",
     {"model": "smollm2", "messages": [{"role": "user", "content": None}]}, 400, "a user message needs content"),
    ("a text part without text", "/v1/chat/completions",
     {"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "text"),
    ("a seed beyond 64 bits", "/v1/completions", {"model": "smollm2", "prompt": "x", "seed": 2**70}, 400, "seed"),
    ("no embedding input", "/v1/embeddings", {"model": "minilm", "input": []}, 400, "must not be an empty list"),
    ("a lone surrogate in an embedding input", "/v1/embeddings", b'{"model": "minilm", "input": ["ok", '
     b'"\\ud800"]}', 400, "input.1: Value error, the text is not valid Unicode"),
    ("a lone surrogate in a rerank query", "/v1/rerank", b'{"model": "minilm", "query": "\\ud800", '
     b'"documents": ["a"]}', 400, "query: Value error, the text is not valid Unicode"),
    ("embedding dimensions beyond 32 bits", "/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 2**40},
     400, "dimensions"),
    ("true as a token id", "/v1/completions", {"model": "smollm2", "prompt": [True]}, 400, "prompt"),
    ("max_tokens as a string", "/v1/completions", {"model": "smollm2", "prompt": "x", "max_tokens": "5"}, 400,
     "max_tokens: Input should be a valid integer"),
    ("NaN temperature", "/v1/completions", b'{"model": "smollm2", "prompt": "x", "temperature": NaN}', 400,
     "temperature: Input should be a finite number"),
    ("an empty rerank document", "/v1/rerank", {"model": "minilm", "query": "q", "documents": ["a", ""]}, 400,
     "documents.1: the prompt is empty"),
    ("body not UTF-8", "/v1/completions", b'{"model": "smollm2", "prompt": "\xff\xfe"}', 400, "not valid JSON"),
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


def test_a_header_that_is_not_utf8_is_ignored_without_a_key(url):
    response = httpx.post(f"{url}/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 1},
                          headers={"Authorization": b"Bearer \xff\xfe"})
    assert response.status_code == 200


def assert_disconnect_logged_at_info(caplog, hang_up) -> None:
    """Run `hang_up` (a client leaving mid-request) and check the server logs it as one INFO line, no error."""
    import logging
    caplog.set_level(logging.INFO)
    for name in ("uvicorn", "uvicorn.error"):  # uvicorn's loggers do not propagate to the root logger
        logging.getLogger(name).addHandler(caplog.handler)
    try:
        hang_up()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("disconnected" in r.getMessage() for r in caplog.records):
            time.sleep(0.1)
        time.sleep(0.3)  # anything logged after the abort has been logged by now
    finally:
        for name in ("uvicorn", "uvicorn.error"):
            logging.getLogger(name).removeHandler(caplog.handler)
    assert any(r.levelno == logging.INFO and "disconnected" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_an_abandoned_request_is_an_info_line_not_an_error(url, caplog):
    """A client that hangs up on a non-streamed request aborts it: an expected end, logged at INFO."""
    def hang_up():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"model": "smollm2", "prompt": "Once upon a time",
                                                      "max_tokens": 200, "temperature": 0}, timeout=0.5)
    assert_disconnect_logged_at_info(caplog, hang_up)


def test_a_prompt_alone_over_the_limit_names_the_prompt(url):
    response = httpx.post(f"{url}/v1/completions", json={"model": "smollm2", "prompt": "word " * 400,
                                                         "max_tokens": 4})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_a_client_that_hangs_up_while_sending_its_body_is_an_info_line(url, caplog):
    from urllib.parse import urlparse

    def hang_up():
        address = urlparse(url)
        with socket.create_connection((address.hostname, address.port)) as connection:
            connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 500\r\n\r\n{\"model\": \"smollm2\"")  # 480 bytes short
    assert_disconnect_logged_at_info(caplog, hang_up)


def test_a_body_that_stops_half_way_is_refused_with_408_and_its_connection_closed(url, monkeypatch):
    from urllib.parse import urlparse

    from wde.entrypoints.openai import api_server
    monkeypatch.setattr(api_server, "BODY_TIMEOUT_S", 0.5)
    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 500\r\n\r\n{\"model\": \"smollm2\"")  # and nothing more
        started = time.monotonic()
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert time.monotonic() - started < 5
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["message"] == "the request body did not arrive within 0.5 s"
    assert httpx.get(f"{url}/health").status_code == 200


def test_latencies_are_kept_as_a_histogram(url):
    from wde.entrypoints.openai.metrics import LATENCY_BUCKETS
    httpx.post(f"{url}/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2}, timeout=60)
    text = httpx.get(f"{url}/metrics").text
    buckets = [int(line.split()[-1]) for line in text.splitlines()
               if line.startswith('wde_request_latency_seconds_bucket{model="smollm2"')]
    assert len(buckets) == len(LATENCY_BUCKETS) + 1 and buckets == sorted(buckets) and buckets[-1] > 0


def test_wrong_method_is_405(url):
    response = httpx.get(f"{url}/v1/completions")
    assert response.status_code == 405 and "method not allowed" in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir) -> LLMEngine:
    return LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=256, disable_log_stats=True)


@pytest.fixture(scope="module")
def tiny_url(tiny_engine):
    yield from serve({"tiny": AsyncEngine(tiny_engine, "tiny")}, api_key="secret")


def test_the_api_key_is_compared_in_constant_time_and_any_header_bytes_are_refused(tiny_url, monkeypatch):
    import hmac

    from wde.entrypoints.openai import api_server
    compared, real = [], hmac.compare_digest

    def compare_digest(a, b):
        compared.append((a, b))
        return real(a, b)
    monkeypatch.setattr(api_server.hmac, "compare_digest", compare_digest)
    for header in (b"Bearer \xff\xfe", b"Bearer secre", "Bearer secret"):
        response = httpx.get(f"{tiny_url}/v1/models", headers={"Authorization": header})
        assert response.status_code == (200 if header == "Bearer secret" else 401)
    assert [given for given, _ in compared] == [b"Bearer \xff\xfe", b"Bearer secre", b"Bearer secret"]


def test_api_key_is_required(tiny_url):
    assert httpx.get(f"{tiny_url}/health").status_code == 200  # health probes need no key
    assert httpx.get(f"{tiny_url}/v1/models").status_code == 401
    denied = httpx.post(f"{tiny_url}/v1/completions", json={"model": "tiny", "prompt": "w5"},
                        headers={"Authorization": "Bearer wrong"})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=f"{tiny_url}/v1", api_key="secret")
    assert client.completions.create(model="tiny", prompt="w5 w6", max_tokens=3).usage.completion_tokens >= 1


def test_64_concurrent_streams_some_abandoned_and_every_block_freed(tiny_url, tiny_engine):
    async def stream(http: httpx.AsyncClient, i: int) -> tuple[int, str | None]:
        body = {"model": "tiny", "prompt": " ".join(f"w{2 + (i * 7 + j) % 500}" for j in range(5 + i % 20)),
                "max_tokens": 40, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        chunks, finish, tokens = 0, None, 0
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if not chunk["choices"]:  # the usage chunk, last
                    tokens = chunk["usage"]["completion_tokens"]
                    continue
                chunks += 1
                finish = chunk["choices"][0]["finish_reason"] or finish
                if i % 4 == 0 and chunks == 3:  # a quarter of the clients hang up mid-stream
                    return tokens, "gone"
        return tokens, finish

    async def run_all():
        headers = {"Authorization": "Bearer secret"}
        async with httpx.AsyncClient(base_url=tiny_url, headers=headers, timeout=120) as http:
            return await asyncio.gather(*(stream(http, i) for i in range(64)))
    results = asyncio.run(run_all())
    assert sum(1 for _, finish in results if finish == "gone") == 16
    completed = [(tokens, finish) for tokens, finish in results if finish != "gone"]
    assert len(completed) == 48 and all(finish in ("length", "stop") and tokens >= 1 for tokens, finish in completed)
    assert all(tokens == 40 for tokens, finish in completed if finish == "length")
    assert any(finish == "length" for _, finish in completed)
    deadline = time.monotonic() + 15  # the abandoned streams' aborts reach the engine thread between steps
    while time.monotonic() < deadline and tiny_engine.has_unfinished_requests():
        time.sleep(0.1)
    assert not tiny_engine.has_unfinished_requests()
    manager = tiny_engine.kv_cache_manager
    assert manager.num_free_blocks == manager.num_blocks


class FaultyWorker(__import__("wde.workflows.decoding.worker", fromlist=["DecodingWorker"]).DecodingWorker):
    """Fails any step whose batch holds token 13: a fault of the engine's, found once the request runs."""

    def launch(self, model_input):  # every step comes through here, synchronous (execute_model) or not
        if (model_input.input_ids == 13).any():
            raise RuntimeError("token 13 breaks this model")
        return super().launch(model_input)


@pytest.fixture(scope="module")
def faulty_url(tiny_model_dir):
    from wde.tasks.chat.workflow import ChatWorkflow

    class Faulty(ChatWorkflow):
        Worker = f"{__name__}:FaultyWorker"
    engine = LLMEngine.from_workflow(Faulty, model=tiny_model_dir("qwen3"), num_kv_blocks=64, disable_log_stats=True)
    yield from serve({"faulty": AsyncEngine(engine, "faulty")})


def test_a_request_that_fails_in_the_engine_says_why_streamed_or_not(faulty_url):
    body = {"model": "faulty", "prompt": [5, 13, 6], "max_tokens": 4}
    whole = httpx.post(f"{faulty_url}/v1/completions", json=body)
    assert whole.status_code == 500 and whole.json()["error"]["type"] == "server_error"
    assert "token 13 breaks this model" in whole.json()["error"]["message"]
    with httpx.stream("POST", f"{faulty_url}/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200  # sent before the engine ran it
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "token 13 breaks this model" in error["message"] and error["type"] == "server_error"
    client = openai.OpenAI(base_url=f"{faulty_url}/v1", api_key="unused")
    with pytest.raises(openai.APIError, match="token 13 breaks this model"):
        for _ in client.completions.create(model="faulty", prompt=[5, 13, 6], max_tokens=4, stream=True):
            pass
    assert client.completions.create(model="faulty", prompt=[5, 6], max_tokens=3).usage.completion_tokens == 3


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    age: int = pydantic.Field(ge=0, le=120)


def test_structured_outputs_through_the_openai_client(client):
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    parsed = client.chat.completions.parse(model="smollm2", messages=messages, response_format=Person,
                                           temperature=0, max_tokens=60).choices[0].message.parsed
    assert isinstance(parsed, Person)
    short = [{"role": "user", "content": 'Reply with the JSON object {"ok": true} and nothing else.'}]
    reply = client.chat.completions.create(model="smollm2", messages=short, temperature=0, max_tokens=200,
                                           response_format={"type": "json_object"}).choices[0]
    assert reply.finish_reason == "stop" and isinstance(json.loads(reply.message.content), dict)
    chosen = client.completions.create(model="smollm2", prompt="Is the sky blue?", max_tokens=5, temperature=0,
                                       extra_body={"guided_choice": ["yes", "no"]}).choices[0].text
    assert chosen in ("yes", "no")
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=20, temperature=0, stream=True,
        extra_body={"structured_outputs": {"regex": "[a-z]{3,6}@[a-z]{3,6}\\.com"}}))
    assert re.fullmatch(r"[a-z]{3,6}@[a-z]{3,6}\.com", streamed)


@pytest.mark.parametrize("extra,message", [
    ({"structured_outputs": {"regex": "(open"}}, "structured_outputs.regex could not be compiled"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "give one"),
    ({"response_format": {"type": "json_schema"}}, "takes a json_schema"),
    ({"guided_json": '{"type": "object", "properties": 3}'}, "structured_outputs.json could not be compiled"),
    ({"guided_regex": ""}, "guided_regex: String should have at least 1 character"),
    ({"guided_json": {"type": "array", "uniqueItems": True}}, "cannot hold the output to, at /: uniqueItems"),
    ({"guided_json": "5"}, "structured_outputs.json must be a JSON schema, an object; it is 5"),
    ({"structured_outputs": {"json": "null"}}, "must be a JSON schema, an object; it is null")])
def test_a_bad_constraint_is_a_400_naming_it(client, extra, message):
    with pytest.raises(openai.BadRequestError, match=re.escape(message)):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=5, extra_body=extra)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_call_comes_back_as_tool_calls_that_validate(client, stream):
    named = {"type": "function", "function": {"name": "get_weather"}}
    answer = client.chat.completions.create(model="smollm2", messages=WEATHER_QUESTION, tools=[WEATHER_TOOL, TIME_TOOL],
                                            tool_choice=named, temperature=0, max_tokens=60, stream=stream)
    if stream:
        chunks = list(answer)
        deltas = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or []]
        assert len(deltas) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
        name, arguments = deltas[0].function.name, deltas[0].function.arguments
    else:
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        name, arguments = call.function.name, call.function.arguments
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER_TOOL["function"]["parameters"])


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_call_cut_by_a_stop_string_is_content_not_a_500(client, stream):
    answer = client.chat.completions.create(model="smollm2", messages=WEATHER_QUESTION, tools=[WEATHER_TOOL],
                                            tool_choice="required", temperature=0, max_tokens=60, stop=[","],
                                            stream=stream)
    if stream:
        chunks = list(answer)
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert not any(chunk.choices[0].delta.tool_calls for chunk in chunks)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks).lstrip().startswith("[")
    else:
        choice = answer.choices[0]
        assert choice.finish_reason == "stop" and not choice.message.tool_calls
        assert choice.message.content.lstrip().startswith("[")  # the calls' JSON, up to the stop string


@pytest.mark.parametrize("tools", [False, True])
def test_each_streamed_completion_of_n_finishes_once(client, tools):
    """n > 1 streamed: a completion that finished is not sent again with each later step of the others."""
    # the completions end at different steps: at a stop string, or at the end of their calls
    extra = {"tools": [WEATHER_TOOL], "tool_choice": "required"} if tools else {"stop": ["e"]}
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=WEATHER_QUESTION, n=3, temperature=1.2, seed=3, max_tokens=40, stream=True,
        **extra))
    finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1, 2]
    if tools:
        calls = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert len(calls) == len(set(calls))


def test_tool_choice_required_and_a_conversation_that_carries_the_tools_answer(client):
    choice = client.chat.completions.create(model="smollm2", messages=WEATHER_QUESTION, tools=[WEATHER_TOOL, TIME_TOOL],
                                            tool_choice="required", temperature=0, max_tokens=80).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    assert {c.function.name for c in choice.message.tool_calls} <= {"get_weather", "get_time"}
    call = choice.message.tool_calls[0]
    follow_up = WEATHER_QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees"}]
    answer = client.chat.completions.create(model="smollm2", messages=follow_up, tools=[WEATHER_TOOL],
                                            temperature=0, max_tokens=12).choices[0]  # tool_choice auto
    assert answer.finish_reason in ("stop", "length") and answer.message.content


def test_langchain_with_structured_output_and_bind_tools(url):
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(base_url=f"{url}/v1", api_key="unused", model="smollm2", temperature=0,
                                       max_tokens=150)
    person = chat.with_structured_output(Person, method="json_schema").invoke("Describe a person.")
    assert isinstance(person, Person)
    by_function = chat.with_structured_output(Person, method="function_calling").invoke("Describe a person.")
    assert isinstance(by_function, Person)
    forced = chat.bind_tools([WEATHER_TOOL], tool_choice="get_weather").invoke("Weather in Oslo?")
    [call] = forced.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER_TOOL["function"]["parameters"])


@pytest.mark.parametrize("extra,message", [
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "not among the tools"),
    ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "same function name"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "takes no other constraint"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name")])
def test_bad_tools_are_a_400_naming_them(client, extra, message):
    with pytest.raises(openai.BadRequestError, match=re.escape(message)):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=5, extra_body=extra)


@pytest.fixture(scope="module")
def reasoning_client():
    """A server that splits <think> reasoning off (--reasoning-parser qwen3), over SmolLM2, which a regex makes
    write some."""
    engine = LLMEngine.from_engine_args(num_kv_blocks=64, max_model_len=128, disable_log_stats=True)
    for url in serve({"smollm2": AsyncEngine(engine, "smollm2")}, reasoning_parser="qwen3"):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused")


THINKING = r"<think>[a-z]{2,6}( [a-z]{2,6}){0,3}</think>\n\n[A-Z][a-z]{1,8}\."


@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL]], ids=["no tools", "tools (content held)"])
def test_reasoning_is_split_off_whole_and_streamed(reasoning_client, tools):
    request = dict(model="smollm2", messages=WEATHER_QUESTION, temperature=0, max_tokens=40,
                   extra_body={"guided_regex": THINKING}, **({"tools": tools} if tools else {}))
    whole = reasoning_client.chat.completions.create(**request).choices[0].message
    reasoning = whole.model_extra["reasoning_content"]
    assert re.fullmatch(r"[a-z]{2,6}( [a-z]{2,6}){0,3}", reasoning)
    assert re.fullmatch(r"[A-Z][a-z]{1,8}\.", whole.content)
    chunks = list(reasoning_client.chat.completions.create(stream=True, **request))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == whole.content
