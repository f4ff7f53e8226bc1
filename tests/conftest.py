import logging
import os
import tempfile
import weakref
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run through the interpreter on a machine with no GPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
# what the tests' .gguf files hold is cached for this run only (the engine processes it starts inherit it)
_CACHE = tempfile.TemporaryDirectory(prefix="wde-test-cache-")
os.environ.setdefault("WDE_CACHE_DIR", _CACHE.name)

from tests.tiny_models import write_tiny_model
from wde.core.config import DEFAULT_MODEL_FILE, default_model_path
from wde.core.engine.llm_engine import LLMEngine

logging.getLogger("wde").setLevel(logging.INFO)


def smollm2_folder() -> str:
    return str(Path(default_model_path()).parent)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own model and tokenizer from the same .gguf file: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=DEFAULT_MODEL_FILE)
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), gguf_file=DEFAULT_MODEL_FILE,
                                                 dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir("qwen3", **config_overrides) -> folder of a random checkpoint (made once per variant)."""
    made = {}

    def make(shape: str, **overrides) -> str:
        key = (shape, repr(sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{shape}-")
            made[key] = str(write_tiny_model(folder, shape, **overrides))
        return made[key]
    return make


@pytest.fixture(scope="session")
def served_smollm2():
    """The server as `wde serve` runs it, SmolLM2 and all-MiniLM-L6-v2 each in an engine process of its own:
    (base URL, engines by name). One for the session: its two processes take half a minute to start."""
    from tests.served import serve
    from wde.core.config import EngineArgs, default_embed_model_path
    from wde.entrypoints.openai.process_engine import start_engines
    engines = start_engines({"smollm2": EngineArgs(num_kv_blocks=128, max_model_len=256, disable_log_stats=True),
                             "minilm": EngineArgs(model=default_embed_model_path())})
    for url in serve(engines):
        yield url, engines


@pytest.fixture(scope="session")
def smollm2_reference():
    """The offline API on the served SmolLM2: what the server's answers are checked against."""
    from wde import LLM
    return LLM(num_kv_blocks=128, max_model_len=256, disable_log_stats=True)


@pytest.fixture(autouse=True)
def every_kv_block_is_free_after_each_test(monkeypatch):
    """Every engine a test builds must end the test with no request left and every KV block free."""
    engines, build = [], LLMEngine.__init__

    def tracked_init(self, *args, **kwargs):
        build(self, *args, **kwargs)
        engines.append(weakref.ref(self))  # weak: an engine the test drops must still be garbage-collected
    monkeypatch.setattr(LLMEngine, "__init__", tracked_init)
    yield
    for engine in filter(None, (ref() for ref in engines)):
        assert_all_blocks_free(engine)


def assert_all_blocks_free(engine) -> None:
    manager = engine.kv_cache_manager
    assert manager.num_free_blocks == manager.num_blocks, \
        f"{manager.num_blocks - manager.num_free_blocks} KV blocks still held"
    assert not engine.has_unfinished_requests()


def run_to_completion(engine) -> dict:
    """Step until idle; return request_id -> final RequestOutput (and check the cache is empty again)."""
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                assert output.request_id not in finished, "a request finished twice"
                finished[output.request_id] = output
    assert_all_blocks_free(engine)
    return finished


def pytest_terminal_summary(terminalreporter):
    from tests.fuzz import PROFILE, cases_tried
    if cases_tried:
        terminalreporter.section(f"fuzz cases tried (profile {PROFILE})")
        for test, count in sorted(cases_tried.items()):
            terminalreporter.write_line(f"{count:7d}  {test}")
        terminalreporter.write_line(f"{sum(cases_tried.values()):7d}  in all")
