"""The engine core's own process, behind `wde serve`: it builds an LLMEngine, then loops: take every command the
server sent (add a batch of requests, abort, read stats, stop), run one step, send what the step made back in
one message. The server's process does HTTP and tokenization; the two never share a GIL.

The wire is ZeroMQ (pyzmq: framed messages over a Unix socket, with queues on both ends, so neither side
waits for the other to read). A step's outputs of a decoding engine, the one message sent every step, are
encoded with msgspec: 0.13 ms for 256 outputs against pickle's 0.65 ms, on the engine's critical path. The
rest (commands with their params, pooled outputs with tensors, replies, the tokenizer at start) is pickled:
both ends are the same wde, and the sockets live in a folder only this user can open.
"""
import logging
import os
import pickle
import sys
import time

import msgspec
import zmq

from wde.core.config import EngineArgs
from wde.core.engine.llm_engine import LLMEngine
from wde.entrypoints.openai.served_engine import EngineInfo, add_all

logger = logging.getLogger(__name__)
IDLE_POLL_MS = 500  # how long an idle engine waits for a command before it looks around again
PARENT_CHECK_S = 0.5  # how often the engine checks that the server that started it is still there


def run_engine_process(args: dict, commands_address: str, outputs_address: str, log_level: int) -> None:
    """The process's main: report ready (with what the server needs) or why the engine could not start, then
    serve commands until told to stop or the server's process is gone."""
    # a group of its own: Ctrl+C or `timeout` signal the server's group, and the server then stops the engine in
    # order (finishing nothing half-way); if the server is killed outright, the engine sees it is gone
    os.setpgrp()
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format="%(levelname)s %(asctime)s %(name)s [engine]: %(message)s", datefmt="%H:%M:%S")
    parent = os.getppid()
    context = zmq.Context()
    commands, outputs = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    outputs.setsockopt(zmq.SNDHWM, 0)  # no cap: the engine never waits for the server to read
    commands.connect(commands_address)
    outputs.connect(outputs_address)
    try:
        engine = LLMEngine.from_engine_args(EngineArgs(**args))
    except BaseException as e:  # noqa: BLE001 - whatever stopped it, the server says it and exits
        outputs.send_multipart([b"failed", pickle.dumps(f"{type(e).__name__}: {e}")])
        outputs.close(linger=5000)
        raise SystemExit(1) from None
    info = EngineInfo.of(engine)
    outputs.send_multipart([b"ready", pickle.dumps(info)])
    try:
        EngineLoop(engine, commands, outputs, parent).run()
    finally:
        engine.close()
        outputs.close(linger=2000)
        commands.close(linger=0)
        context.term()


class EngineLoop:
    def __init__(self, engine: LLMEngine, commands: zmq.Socket, outputs: zmq.Socket, parent_pid: int):
        self.engine, self.commands, self.outputs, self.parent_pid = engine, commands, outputs, parent_pid
        self.encode_tokens = msgspec.msgpack.Encoder().encode if engine.workflow.task == "generate" else None
        self.described: set[str] = set()  # requests whose first output (with the prompt's ids) went out
        self.stopped = False
        self.next_parent_check = 0.0

    def run(self) -> None:
        while not self.stopped:
            busy = self.engine.has_unfinished_requests()
            if time.monotonic() >= self.next_parent_check:  # busy or not: nobody may be reading any more
                self.next_parent_check = time.monotonic() + PARENT_CHECK_S
                if os.getppid() != self.parent_pid:  # the server died without a word: do not outlive it
                    logger.warning("the server's process is gone; the engine stops")
                    return
            if not self.commands.poll(0 if busy else IDLE_POLL_MS) and not busy:
                continue
            replies = self.apply_commands()
            if self.stopped:
                return
            step_outputs = []
            if self.engine.has_unfinished_requests():
                try:
                    step_outputs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - the engine cannot go on: the server fails every request
                    logger.exception("the engine stopped")
                    self.outputs.send_multipart([b"dead", pickle.dumps(f"{type(e).__name__}: {e}")])
                    return
            self.send(replies, step_outputs)

    def apply_commands(self) -> list:
        """Every command waiting, in order; the replies the server awaits (token, value)."""
        replies = []
        while self.commands.poll(0):
            kind, token, value = pickle.loads(self.commands.recv())
            if kind == "add":
                replies.append((token, add_all(self.engine, value)))
            elif kind == "abort":
                for request_id in value:
                    self.engine.abort_request(request_id)
                    self.described.discard(request_id)
            elif kind == "stats":
                replies.append((token, self.engine.get_stats()))
            elif kind == "stop":
                self.stopped = True
        return replies

    def send(self, replies: list, step_outputs: list) -> None:
        if not replies and not step_outputs:
            return
        trimmed = [self.trim(output) for output in step_outputs]
        encoded = self.encode_tokens(trimmed) if self.encode_tokens else pickle.dumps(trimmed)
        try:
            self.outputs.send_multipart([b"step", pickle.dumps(replies), encoded], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # nobody at the other end: the server's process is gone
            logger.warning("the server's process is gone; the engine stops")
            self.stopped = True

    def trim(self, output):
        """The prompt's ids go out with a request's first output only: the server keeps them from there."""
        first = output.request_id not in self.described
        if output.finished:
            self.described.discard(output.request_id)
        else:
            self.described.add(output.request_id)
        if not first:  # outputs are made anew every step: this one is ours to change
            output.prompt, output.prompt_token_ids = None, []
        return output
