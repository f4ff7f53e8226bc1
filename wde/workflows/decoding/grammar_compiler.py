"""xgrammar's compiler in a process of its own (`python -m wde.workflows.decoding.grammar_compiler`).

A compilation cannot be stopped once begun, and small constraints can take minutes: the regex "(a|b)*" written
400 times (2.4 KB) took 27 s here, its time growing as the cube of its length, and what runs in a thread of the
engine would hold that thread, and the CPU, for as long. In a process, one that runs past its time is ended with
its process (which is started again), and its request fails; the others' compilations go on in the other
processes. Compiled grammars come back serialized (85 KB and 10 ms for a small JSON schema over a 49k
vocabulary). Started as a plain subprocess, like the tensor-parallel workers, so the user's main script is
never imported again in it; it exits when its parent does.
"""
import os
import pickle
import select
import struct
import subprocess
import sys

from wde.core.orphans import exit_with_parent

HEADER = struct.Struct("<Q")  # each message: its length, then the pickled object


def send(stream, obj) -> None:
    data = pickle.dumps(obj)
    stream.write(HEADER.pack(len(data)) + data)
    stream.flush()


def receive(stream):
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        raise EOFError("the grammar compiler's process ended")
    (size,) = HEADER.unpack(header)
    return pickle.loads(stream.read(size))


class CompilerProcess:
    """One compiler process: compile() sends it a constraint and waits at most `timeout_s` for the result."""

    def __init__(self, tokenizer_info_json: str):
        self.tokenizer_info_json = tokenizer_info_json
        self.process: subprocess.Popen | None = None

    def _start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                            p for p in sys.path if p)})
        send(self.process.stdin, self.tokenizer_info_json)

    def compile(self, method: str, text: str, timeout_s: float) -> tuple[bool, str]:
        """(True, the compiled grammar's JSON) or (False, why not): xgrammar's message, a timeout, a crash."""
        if self.process is None or self.process.poll() is not None:
            self._start()
        try:
            send(self.process.stdin, (method, text))
            ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
            if not ready:
                self.stop()
                return False, f"compiling it took longer than {timeout_s:.0f} s"
            return receive(self.process.stdout)
        except (EOFError, OSError):
            self.stop()
            return False, "the grammar compiler's process ended while compiling it"

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def compile_source(compiler, method: str, text: str):
    if method == "json":
        return compiler.compile_json_schema(text)
    if method == "regex":
        return compiler.compile_regex(text)
    if method == "ebnf":
        return compiler.compile_grammar(text)
    return compiler.compile_lark(text)


def main() -> None:
    import xgrammar
    exit_with_parent(0)
    requests, results = sys.stdin.buffer, sys.stdout.buffer
    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.deserialize_json(receive(requests)), max_threads=1)
    while True:
        try:
            method, text = receive(requests)
        except EOFError:
            return
        try:
            send(results, (True, compile_source(compiler, method, text).serialize_json()))
        except Exception as e:  # noqa: BLE001 - xgrammar's refusal, whatever its kind, goes back as its message
            send(results, (False, str(e)))


if __name__ == "__main__":
    main()
