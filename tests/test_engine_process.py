"""The engine core in its own process (what `wde serve` runs): it dying fails every open request with the
reason, /health says so, new requests get a 503, and no process is left behind; it ends itself when the
server's process dies; one that cannot start says why."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from wde.core.config import EngineArgs
from wde.entrypoints.openai.process_engine import ProcessEngine, start_engines

from tests.served import serve


def exited(pid: int) -> bool:
    """Gone, or a zombie that only waits for its parent to read its status."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(line.split()[1] == "Z" for line in status if line.startswith("State:"))
    except FileNotFoundError:
        return True


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_killed_engine_fails_its_open_requests_and_health_says_why(tiny_model_dir):
    engines = start_engines({"tiny": EngineArgs(model=tiny_model_dir("qwen3"), num_kv_blocks=64,
                                                max_model_len=1024, disable_log_stats=True)})
    pid = engines["tiny"].pid
    for url in serve(engines):
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 1000, "ignore_eos": True}
        first_event, events, answers = threading.Event(), [], []

        def stream():
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first_event.set()

        def whole():
            answers.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60))
        threads = [threading.Thread(target=stream), threading.Thread(target=whole)]
        for thread in threads:
            thread.start()
        assert first_event.wait(60), "the stream never started"
        os.kill(pid, signal.SIGKILL)
        for thread in threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads), "a request hangs after the engine died"
        assert events[-1] == "[DONE]"
        assert "killed by SIGKILL" in json.loads(events[-2])["error"]["message"]
        [answer] = answers
        assert answer.status_code == 503 and "killed by SIGKILL" in answer.json()["error"]["message"]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "killed by SIGKILL" in health.json()["stopped"]["tiny"]
        late = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 2})
        assert late.status_code == 503 and late.json()["error"]["type"] == "server_error"
    assert exited(pid)
    with pytest.raises(ChildProcessError):  # reaped: not even a zombie of ours is left
        os.waitpid(pid, os.WNOHANG)


SERVER_THAT_DIES = """
import asyncio, sys
from wde import SamplingParams
from wde.core.config import EngineArgs
from wde.entrypoints.openai.process_engine import ProcessEngine
if __name__ == "__main__":
    engine = ProcessEngine(EngineArgs(model=sys.argv[1], num_kv_blocks=1024, disable_log_stats=True), "tiny")
    busy = SamplingParams(n=16, max_tokens=1000, ignore_eos=True)  # minutes of work: the engine is busy
    asyncio.run(engine.add_requests([(f"busy-{i}", [5, 6, 7], busy) for i in range(8)]))
    print(engine.pid, flush=True)
    sys.stdin.readline()  # the test kills this process here
"""


def test_the_engine_process_ends_when_the_server_dies(tiny_model_dir, tmp_path):
    script = tmp_path / "server.py"
    script.write_text(SERVER_THAT_DIES)
    server = subprocess.Popen([sys.executable, str(script), tiny_model_dir("qwen3")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        engine_pid = int(server.stdout.readline())
        server.kill()  # no atexit, no stop(): the engine, busy with its requests, is on its own
        server.wait()
        assert wait_until(lambda: exited(engine_pid), 10), "the engine outlived its server"
    finally:
        server.kill()


def test_an_engine_that_cannot_start_says_why(tmp_path):
    with pytest.raises(ValueError, match="the engine could not start: .*nowhere"):
        ProcessEngine(EngineArgs(model=str(tmp_path / "nowhere")), "missing")


@pytest.fixture(scope="module")
def cli_server(tiny_model_dir):
    """`wde serve` as a user starts it, in a process of its own, over a tiny model; its base URL."""
    from tests.served import free_port
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "wde.entrypoints.cli", "serve", "--model",
                               tiny_model_dir("qwen3"), "--served-model-name", "tiny", "--port", str(port),
                               "--max-body-bytes", str(64 << 20), "--disable-log-stats"],
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: server.poll() is not None or healthy(url), 120), "wde serve did not start"
        assert server.poll() is None, f"wde serve exited with code {server.returncode}"
        yield url
    finally:
        server.terminate()
        assert server.wait(timeout=60) == 0  # SIGTERM: an orderly stop, the engine process stopped first


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


SENDER = """
import sys, httpx
body = open(sys.argv[2], "rb").read()
print("ready", flush=True)
sys.stdin.readline()  # go: every sender is loaded, none competes with the server for the CPU while importing
answer = httpx.post(sys.argv[1], content=body, timeout=120, headers={"content-type": "application/json"})
print(answer.status_code, answer.json()["error"]["message"][:200])
"""


def test_health_answers_at_once_while_four_8_mb_prompts_arrive(cli_server, tmp_path):
    """Four 8 MB prompts for a model that reads 1,024 tokens, sent by four other processes (clients of their
    own): refused with a 400 before they are tokenized (no token stands for more than a few characters, so the
    prompt cannot fit), and /health answers within 100 ms meanwhile. Reading and parsing the bodies is the
    event loop's; tokenizing, when a prompt could fit, is done in threads."""
    text = "hello world this is a test " * (8 * 1024 * 1024 // 27)
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"model": "tiny", "prompt": text, "max_tokens": 1}))
    latencies, done = [], threading.Event()

    def probe():
        with httpx.Client() as client:
            while not done.is_set():
                start = time.perf_counter()
                assert client.get(f"{cli_server}/health", timeout=10).status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.005)
    senders = [subprocess.Popen([sys.executable, "-c", SENDER, f"{cli_server}/v1/completions", str(body)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    assert all(sender.stdout.readline() == "ready\n" for sender in senders)
    prober = threading.Thread(target=probe)
    prober.start()
    for sender in senders:  # all four at once
        sender.stdin.write("go\n")
        sender.stdin.flush()
    answers = [sender.communicate(timeout=120)[0] for sender in senders]
    done.set()
    prober.join()
    assert all(a.startswith("400 This model's maximum context length is 1024") for a in answers), answers
    assert max(latencies) < 0.1, f"/health took up to {max(latencies) * 1000:.0f} ms"


def test_prompts_that_could_fit_are_tokenized_and_then_refused(cli_server):
    """A prompt just under the bound is tokenized (in the server's threads, four at a time here), found too
    long, and refused with the same 400; one that fits runs."""
    text = "hello " * (4 * 5 * 1025 // 6)  # the bound: 4 x the longest token (5 characters) x 1,025 tokens
    body = {"model": "tiny", "prompt": text, "max_tokens": 1}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{cli_server}/v1/completions", json=body, timeout=60),
                                range(8)))
    for answer in answers:
        message = answer.json()["error"]["message"]
        assert answer.status_code == 400 and message.endswith("the prompt alone is longer than that.")
    fits = httpx.post(f"{cli_server}/v1/completions", json={**body, "prompt": "hello " * 100}, timeout=60)
    assert fits.status_code == 200 and fits.json()["usage"]["prompt_tokens"] == 100

