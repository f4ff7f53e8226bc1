"""A server for tests: the app on uvicorn in a thread of the test process, on a free port of 127.0.0.1."""
import socket
import threading
import time

import uvicorn

from wde.entrypoints.openai.api_server import build_app

MAX_BODY = 256 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(engines: dict, api_key: str | None = None, reasoning_parser: str | None = None):
    """Start a server in a thread; yield its base URL; stop it and its engines."""
    port = free_port()
    app = build_app(engines, api_key, MAX_BODY, reasoning_parser=reasoning_parser)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
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
