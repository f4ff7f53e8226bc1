"""Entry-point plugins: discovery, WDE_PLUGINS, a broken plugin reported and skipped, override rules, and
registering a backend. (The two plugin packages in plugins/ are installed in CI and tested in their own
folders.)"""
import logging

import importlib_metadata
import pytest

from wde import LLMEngine, register_attention_backend, register_model, register_workflow
from wde.core import plugins, registry
from wde.core.attention.torch_backend import TorchAttentionBackend
from wde.entrypoints.cli import main


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Plugins discovered again in this test, from the real entry points plus any the test adds; registries as
    they were, afterwards."""
    plugins.load_plugins()  # what this process had before the test, restored afterwards
    saved = ({arch: dict(tasks) for arch, tasks in registry._MODELS.items()}, dict(registry._WORKFLOWS),
             dict(registry._ATTENTION_BACKENDS), plugins._statuses)
    added = []
    real = importlib_metadata.entry_points

    def entry_points(group):
        return list(real(group=group)) + [importlib_metadata.EntryPoint(name, value, group) for name, value in added]
    monkeypatch.setattr(importlib_metadata, "entry_points", entry_points)
    plugins.reset_for_tests()
    registry._MODELS.pop("GPT2LMHeadModel", None)
    registry._WORKFLOWS.pop("chat-shortest-first", None)
    yield added
    plugins._statuses = saved[3]
    registry._MODELS.clear(), registry._MODELS.update(saved[0])
    registry._WORKFLOWS.clear(), registry._WORKFLOWS.update(saved[1])
    registry._ATTENTION_BACKENDS.clear(), registry._ATTENTION_BACKENDS.update(saved[2])


def broken_register():
    raise RuntimeError("this plugin is broken on purpose")


def clashing_register():
    register_model("LlamaForCausalLM", model="elsewhere:Model", workflow="elsewhere:Workflow")


def test_installed_plugins_are_discovered_through_entry_points(fresh_plugins):
    statuses = {s.name: s for s in plugins.load_plugins()}
    assert statuses["gpt2"].status == "loaded" and statuses["shortest-first"].status == "loaded"
    assert "GPT2LMHeadModel" in registry.supported_architectures()
    assert registry.workflow_path("chat-shortest-first").endswith(":ShortestFirstChatWorkflow")


def test_wde_plugins_limits_which_plugins_load(fresh_plugins, monkeypatch):
    monkeypatch.setenv("WDE_PLUGINS", "gpt2")
    statuses = {s.name: s.status for s in plugins.load_plugins()}
    assert statuses == {"gpt2": "loaded", "shortest-first": "not selected (WDE_PLUGINS)"}
    with pytest.raises(ValueError, match="unknown workflow 'chat-shortest-first'"):
        registry.workflow_path("chat-shortest-first")


def test_a_broken_plugin_is_reported_and_the_engine_starts_without_it(fresh_plugins, caplog, tiny_model_dir):
    fresh_plugins += [("broken", f"{__name__}:broken_register"), ("missing", "no_such_package:register")]
    with caplog.at_level(logging.WARNING, logger="wde.core.plugins"):
        engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=4)
    statuses = {s.name: s for s in plugins.load_plugins()}
    assert statuses["broken"].status == "failed"
    assert statuses["broken"].error == "RuntimeError: this plugin is broken on purpose"
    assert statuses["missing"].status == "failed" and "ModuleNotFoundError" in statuses["missing"].error
    assert "plugin broken" in caplog.text and "this plugin is broken on purpose" in caplog.text
    assert statuses["gpt2"].status == "loaded" and engine.workflow.__name__ == "ChatWorkflow"


def test_taking_an_architecture_wde_has_needs_override(fresh_plugins):
    fresh_plugins.append(("clash", f"{__name__}:clashing_register"))
    status = next(s for s in plugins.load_plugins() if s.name == "clash")
    assert status.status == "failed"
    assert "'LlamaForCausalLM' is already registered" in status.error and "override=True" in status.error
    assert registry.get_model_entry("LlamaForCausalLM").model.startswith("wde.models.")
    register_model("LlamaForCausalLM", model="elsewhere:Model", workflow="elsewhere:Workflow", override=True)
    assert registry.get_model_entry("LlamaForCausalLM").model == "elsewhere:Model"


class CountingBackend(TorchAttentionBackend):
    calls = 0

    def forward(self, *args):
        CountingBackend.calls += 1
        return super().forward(*args)


def test_a_registered_attention_backend_is_chosen_by_name(fresh_plugins, tiny_model_dir):
    register_attention_backend("counting", f"{__name__}:CountingBackend")
    with pytest.raises(ValueError, match="already registered"):
        register_attention_backend("counting", f"{__name__}:CountingBackend")
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=4, attention_backend="counting")
    engine.add_request("r", [5, 6], None)
    while engine.has_unfinished_requests():
        engine.step()
    assert CountingBackend.calls > 0


def test_a_registered_workflow_is_chosen_by_name(fresh_plugins, tiny_model_dir):
    register_workflow("counting-chat", "tests.test_workflow:CountingWorkflow")
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=4, workflow="counting-chat")
    assert type(engine.scheduler).__name__ == "CountingScheduler"
    with pytest.raises(ValueError, match="unknown workflow 'nope'"):
        LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), workflow="nope")


def test_wde_plugins_command_lists_them(fresh_plugins, capsys):
    fresh_plugins.append(("broken", f"{__name__}:broken_register"))
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "gpt2" in out and "shortest-first" in out and "broken" in out and "this plugin is broken" in out
