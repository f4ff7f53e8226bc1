"""Workflow slots: imported lazily, checked at engine start, overridable one at a time."""
import subprocess
import sys

import pytest

from tests.conftest import run_to_completion
from wde import LLMEngine, SamplingParams
from wde.core.workflow import WorkflowError
from wde.tasks.chat.workflow import ChatWorkflow
from wde.workflows.decoding.scheduler import DecodingScheduler


class MissingModule(ChatWorkflow):
    Scheduler = "wde.no_such_module:Scheduler"


class MissingName(ChatWorkflow):
    OutputProcessor = "wde.workflows.decoding.output_processor:NoSuchProcessor"


class WrongKind(ChatWorkflow):
    Scheduler = "wde.core.tokenizer:HFTokenizer"


class NotAClass(ChatWorkflow):
    Worker = "wde.core.dotted_path:import_object"


class Malformed(ChatWorkflow):
    AttentionBackend = "wde.core.attention.torch_backend.TorchAttentionBackend"


@pytest.mark.parametrize("workflow,slot,path", [
    (MissingModule, "Scheduler", MissingModule.Scheduler),
    (MissingName, "OutputProcessor", MissingName.OutputProcessor),
    (WrongKind, "Scheduler", WrongKind.Scheduler),
    (NotAClass, "Worker", NotAClass.Worker),
    (Malformed, "AttentionBackend", Malformed.AttentionBackend),
])
def test_bad_slot_fails_at_start_naming_workflow_slot_and_path(workflow, slot, path):
    # the model does not exist either: the workflow is checked first, before anything is read
    with pytest.raises(WorkflowError) as error:
        LLMEngine.from_workflow(workflow, model="/nonexistent/model")
    message = str(error.value)
    assert workflow.__qualname__ in message and repr(slot) in message and path in message


def test_every_bad_slot_is_listed_in_one_error():
    class TwoBad(ChatWorkflow):
        Scheduler = "wde.no_such_module:Scheduler"
        Worker = "wde.core.tokenizer:HFTokenizer"
    with pytest.raises(WorkflowError, match="(?s)'Scheduler'.*'Worker'"):
        TwoBad.resolve()


def test_from_workflow_accepts_a_dotted_path_and_rejects_non_workflows():
    with pytest.raises(TypeError, match="not a Workflow"):
        LLMEngine.from_workflow("wde.core.tokenizer:HFTokenizer")


def test_components_are_imported_only_when_an_engine_resolves_them():
    code = ("import sys, wde; from wde.tasks.chat.workflow import ChatWorkflow\n"
            "slots = ['wde.workflows.decoding.scheduler', 'wde.workflows.decoding.worker', 'wde.core.sampling.sampler',"
            " 'wde.core.attention.torch_backend']\n"
            "assert not [m for m in slots if m in sys.modules], [m for m in slots if m in sys.modules]\n"
            "ChatWorkflow.resolve()\n"
            "assert all(m in sys.modules for m in slots)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


class CountingScheduler(DecodingScheduler):
    steps = 0

    def schedule(self):
        CountingScheduler.steps += 1
        return super().schedule()


class CountingWorkflow(ChatWorkflow):
    Scheduler = f"{__name__}:CountingScheduler"


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_subclass_overrides_one_slot(tiny_model_dir, async_scheduling):
    CountingScheduler.steps = 0
    engine = LLMEngine.from_workflow(CountingWorkflow, model=tiny_model_dir("qwen3"), num_kv_blocks=16,
                                     async_scheduling=async_scheduling)
    assert isinstance(engine.scheduler, CountingScheduler)
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    outputs = run_to_completion(engine)
    assert len(outputs["a"].outputs[0].token_ids) == 4
    # one prefill step, then three decode steps; overlapped, a last call schedules nothing and collects the third
    assert CountingScheduler.steps == (5 if async_scheduling else 4)


def test_from_engine_args_picks_the_workflow_from_the_architecture(tiny_model_dir):
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen2"), num_kv_blocks=8)
    assert engine.workflow is ChatWorkflow
    assert type(engine.executor.worker.model).__name__ == "Qwen2ForCausalLM"
