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

import httpx
import pytest

from wde.core.config import EngineArgs
from wde.entrypoints.openai.process_engine import ProcessEngine, start_engines

from .test_server import serve


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
import os, sys
from wde.core.config import EngineArgs
from wde.entrypoints.openai.process_engine import ProcessEngine
if __name__ == "__main__":
    engine = ProcessEngine(EngineArgs(model=sys.argv[1], num_kv_blocks=16, disable_log_stats=True), "tiny")
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
        server.kill()  # no atexit, no stop(): the engine is on its own
        server.wait()
        assert wait_until(lambda: exited(engine_pid), 10), "the engine outlived its server"
    finally:
        server.kill()


def test_an_engine_that_cannot_start_says_why(tmp_path):
    with pytest.raises(ValueError, match="the engine could not start: .*nowhere"):
        ProcessEngine(EngineArgs(model=str(tmp_path / "nowhere")), "missing")
