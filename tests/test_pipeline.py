"""The resolved pipeline: each slot's contract checked, each decision made once, the whole of it logged."""
import logging
from dataclasses import replace

import pytest
import torch

from wde import LLMEngine
from wde.core import interfaces
from wde.core.attention.selector import select_attention_backend
from wde.core.attention.torch_backend import TorchAttentionBackend
from wde.core.config import EngineArgs, EngineConfig, default_embed_model_path
from wde.core.engine.executor import LocalExecutor
from wde.core.engine.pipeline import choose_executor
from wde.core.workflow import WorkflowError
from wde.tasks.chat.workflow import ChatWorkflow
from wde.tasks.embed.workflow import EncoderEmbedWorkflow
from wde.workflows.decoding.scheduler import DecodingScheduler


class HalfAScheduler(interfaces.Scheduler):
    """Implements add_request only: a plugin author's unfinished scheduler."""

    def add_request(self, request) -> None: ...


class OneArgumentScheduler(DecodingScheduler):
    def __init__(self, config):  # the engine builds a scheduler with (config, kv_cache_manager, process_request)
        super().__init__(config, None, None)


class MyTorchBackend(TorchAttentionBackend):
    """A workflow's own backend: "auto" must keep it, on any device."""


class UnfinishedScheduler(ChatWorkflow):
    Scheduler = "tests.test_pipeline:HalfAScheduler"


class EncoderBackendForADecoder(ChatWorkflow):
    AttentionBackend = "wde.core.attention.encoder_backends:EncoderTorchBackend"


def test_a_slot_that_leaves_abstract_methods_is_refused_naming_them():
    with pytest.raises(WorkflowError, match="HalfAScheduler does not implement abort_request, free_finished, "
                                            "get_stats, has_unfinished_requests, schedule"):
        UnfinishedScheduler.resolve()


def test_a_backend_of_the_wrong_kind_for_causal_is_refused_at_resolve():
    with pytest.raises(WorkflowError, match="'encoder' attention; a workflow with causal=True needs 'paged'"):
        EncoderBackendForADecoder.resolve()


def test_every_built_in_workflow_resolves():
    from wde.tasks.classify.workflow import EncoderClassifyWorkflow
    from wde.tasks.embed.workflow import DecoderEmbedWorkflow
    from wde.tasks.rerank.workflow import CrossEncoderWorkflow, DecoderRerankWorkflow
    for workflow in (ChatWorkflow, EncoderEmbedWorkflow, DecoderEmbedWorkflow, CrossEncoderWorkflow,
                     DecoderRerankWorkflow, EncoderClassifyWorkflow):
        components = workflow.resolve()
        assert set(components) == set(workflow.SLOT_KINDS)


def test_auto_on_a_gpu_keeps_a_workflows_own_backend(tiny_model_dir):
    config = EngineConfig.from_args(EngineArgs(model=tiny_model_dir("qwen3")))
    on_gpu = replace(config, device=torch.device("cuda"))  # the selector only reads the device's type here
    assert select_attention_backend(on_gpu, MyTorchBackend) is MyTorchBackend
    assert select_attention_backend(on_gpu, TorchAttentionBackend) is not TorchAttentionBackend  # the reference
    assert select_attention_backend(config, TorchAttentionBackend) is TorchAttentionBackend  # CPU: the slot


def test_the_task_is_resolved_once(tiny_model_dir):
    assert EngineConfig.from_args(EngineArgs(model=tiny_model_dir("qwen3"))).model.task == "generate"
    assert EngineConfig.from_args(EngineArgs(model=default_embed_model_path())).model.task == "embed"
    config = EngineConfig.from_args(EngineArgs(model=tiny_model_dir("qwen3"), task="embed"))
    with pytest.raises(ValueError, match="workflow ChatWorkflow does 'generate', but the engine was asked to "
                                         "'embed'"):
        LLMEngine(ChatWorkflow, config)


def test_the_executor_is_chosen_in_one_place(tiny_model_dir):
    from wde.core.parallel.multiproc_executor import MultiprocExecutor
    config = EngineConfig.from_args(EngineArgs(model=tiny_model_dir("qwen3")))
    assert choose_executor(config, LocalExecutor) is LocalExecutor
    split = EngineConfig.from_args(EngineArgs(model=tiny_model_dir("qwen3"), tensor_parallel_size=2))
    assert choose_executor(split, LocalExecutor) is MultiprocExecutor

    class SingleDevice(LocalExecutor):
        pass
    with pytest.raises(ValueError, match="SingleDevice\\) cannot run tensor_parallel_size=2: an executor that "
                                         "can says supports_tensor_parallel = True"):
        choose_executor(split, SingleDevice)


def test_the_resolved_pipeline_is_logged_slot_by_slot(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="wde.core.engine.pipeline"):
        engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=8)
    text = caplog.text
    assert "pipeline of ChatWorkflow for Qwen3ForCausalLM (Qwen3ForCausalLM, decoder)" in text
    assert "async scheduling on" in text
    for slot, cls in engine.components.items():
        assert f"{slot:<17} {cls.__module__}.{cls.__qualname__}" in text
    assert type(engine.stepper).__name__ == "DecodingStepper"


@pytest.mark.parametrize("asked,resolved", [(None, True), (True, True), (False, False)])
def test_decoding_schedules_asynchronously_unless_told_not_to(tiny_model_dir, asked, resolved):
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=8, async_scheduling=asked)
    assert engine.config.args.async_scheduling is resolved and engine.stepper.overlapped is resolved


def test_an_encoder_overlaps_its_steps_and_has_a_kv_cache_without_blocks():
    engine = LLMEngine.from_engine_args(model=default_embed_model_path())
    assert engine.config.args.async_scheduling is True and type(engine.stepper).__name__ == "OverlappedStepper"
    assert engine.kv_cache_manager.num_blocks == 0 and not engine.scheduler.uses_kv_cache


def test_a_stepper_that_cannot_overlap_steps_turns_async_scheduling_off_with_a_word(caplog):
    from wde.tasks.embed.workflow import EncoderEmbedWorkflow

    class SynchronousEmbed(EncoderEmbedWorkflow):
        Stepper = "wde.core.engine.stepping:SyncStepper"
    with caplog.at_level(logging.INFO, logger="wde.core.engine.pipeline"):
        engine = LLMEngine.from_workflow(SynchronousEmbed, model=default_embed_model_path(), async_scheduling=True)
    assert engine.config.args.async_scheduling is False and type(engine.stepper).__name__ == "SyncStepper"
    assert "async scheduling off: test_a_stepper_that_cannot_overlap" in caplog.text


def test_what_the_other_ranks_receive_leaves_sampling_and_pooling_to_rank_0(tiny_model_dir):
    from wde import SamplingParams
    from wde.core.request import Request
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=8)
    engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0.5, max_tokens=2))
    model_input = engine.model_pre_processor(engine.scheduler.schedule())
    assert model_input.sampling is not None and model_input.for_workers().sampling is None
    assert isinstance(engine.scheduler.requests["a"].request, Request)
    engine.abort_request("a")


def test_components_of_two_workflow_families_are_refused_together():
    class Mixed(EncoderEmbedWorkflow):
        Scheduler = "wde.workflows.decoding.scheduler:DecodingScheduler"
    with pytest.raises(WorkflowError, match="(?s)'ModelPreProcessor'.*takes a PrefillOnlySchedulerOutput.*"
                                            "the Scheduler gives a SchedulerOutput.*different workflow families"):
        Mixed.resolve()


def test_a_slot_holding_a_class_instead_of_its_path_is_refused_naming_that():
    class ClassNotPath(ChatWorkflow):
        Scheduler = DecodingScheduler
    with pytest.raises(WorkflowError, match="a slot holds a 'package.module:Name' string"):
        ClassNotPath.resolve()


def test_a_module_that_fails_to_import_in_any_way_is_one_listed_slot(tmp_path, monkeypatch):
    (tmp_path / "broken_slot.py").write_text("def (:\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    class SyntaxErrorSlot(ChatWorkflow):
        Scheduler = "broken_slot:Scheduler"
        Stepper = "json:dumps"
    with pytest.raises(WorkflowError, match="(?s)'Scheduler'.*SyntaxError.*'Stepper'.*not a subclass"):
        SyntaxErrorSlot.resolve()


def test_a_named_backend_that_is_not_a_complete_backend_is_refused_before_loading(tiny_model_dir):
    from wde import register_attention_backend
    register_attention_backend("half", "tests.test_pipeline:HalfAScheduler", override=True)
    with pytest.raises(ValueError, match="attention_backend 'half' = .*is not a subclass of "
                                         "wde.core.interfaces.AttentionBackend"):
        LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), attention_backend="half", num_kv_blocks=8)


def test_a_registered_workflow_name_that_is_no_workflow_is_refused():
    from wde import register_workflow
    register_workflow("not-a-workflow", "wde.core.tokenizer:HFTokenizer", override=True)
    with pytest.raises(TypeError, match="is not a Workflow subclass"):
        LLMEngine.from_engine_args(workflow="not-a-workflow")


def test_a_component_with_the_wrong_constructor_names_its_slot(tiny_model_dir):
    class BadInit(ChatWorkflow):
        Scheduler = "tests.test_pipeline:OneArgumentScheduler"
    with pytest.raises(TypeError, match="slot 'Scheduler' .*OneArgumentScheduler.* of workflow .*BadInit "
                                        "could not be built"):
        LLMEngine.from_workflow(BadInit, model=tiny_model_dir("qwen3"), num_kv_blocks=8)
