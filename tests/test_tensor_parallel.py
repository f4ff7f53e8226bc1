"""Tensor parallelism on the CPU: two gloo processes give the tokens of one, spawned or under torchrun; a failing
rank surfaces in the caller; no process outlives its engine."""
import gc
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch.distributed

from tests.test_parity_random import random_prompts
from wde import LLM, SamplingParams
from wde.core.parallel.multiproc_executor import ExecutorDeadError
from wde.tasks.chat.workflow import ChatWorkflow
from wde.workflows.decoding.worker import DecodingWorker

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)  # rank 0 gathers the logits
ARGMAX = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)  # each rank's vocabulary slice votes
PROMPTS = random_prompts([5, 37, 12], seed=20)


def generate(model: str, prompts=PROMPTS, **args) -> list:
    """Greedy completions, with logprobs (from gathered logits), then without (from the ranks' best tokens)."""
    llm = LLM(model=model, num_kv_blocks=48, **args)
    try:
        gathered = [o.outputs[0] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        voted = [o.outputs[0] for o in llm.generate(prompts, ARGMAX, use_tqdm=False)]
    finally:
        llm.close()
    assert [c.token_ids for c in voted] == [c.token_ids for c in gathered]
    return gathered + voted


def assert_same_generation(a: list, b: list) -> None:
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    for x, y in zip(a, b):
        for step_x, step_y, token in zip(x.logprobs or [], y.logprobs or [], x.token_ids):
            assert abs(step_x[token].logprob - step_y[token].logprob) < 1e-4


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        return True


def wait_gone(pids: list[int], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(gone(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("shape,overrides,engine_args", [
    ("llama", {}, {}), ("qwen3", {}, {}), ("qwen2", {"num_key_value_heads": 4}, {}), ("qwen2_moe", {}, {}),
    ("mixtral", {}, {}), ("mistral", {}, {}), ("phi3", {}, {}), ("qwen3_moe", {}, {"enable_expert_parallel": True}),
    ("qwen2_moe", {}, {"enable_expert_parallel": True}), ("gemma2", {}, {}), ("mistral", {"sliding_window": 6}, {}),
    ("gemma3", {}, {})],
    ids=["1 KV head (copied)", "2 KV heads", "4 KV heads", "experts and a shared expert sliced", "experts sliced",
         "mistral", "phi3: fused q/k/v and gate/up tensors split", "4 whole experts per rank",
         "2 whole experts per rank and the shared expert sliced", "gemma2: soft-capped slices of the logits",
         "a sliding window on each rank's heads", "gemma3: head norms and two RoPEs"])
def test_two_ranks_give_the_tokens_of_one(tiny_model_dir, shape, overrides, engine_args):
    folder = tiny_model_dir(shape, **overrides)
    assert_same_generation(generate(folder, tensor_parallel_size=2, **engine_args), generate(folder))


def test_expert_parallel_ranks_hold_whole_experts_and_need_one_each(tiny_model_dir):
    from wde.core.layers.moe import FusedMoE
    llm = LLM(model=tiny_model_dir("qwen3_moe"), num_kv_blocks=48, tensor_parallel_size=2,
              enable_expert_parallel=True)
    try:
        layers = [m for m in llm.engine.executor.worker.model.modules() if isinstance(m, FusedMoE)]
        # rank 0 of 2: experts 0-3 of 8, each with all of its 32 intermediate rows (tests/tiny_models.py)
        assert layers and all(m.first_expert == 0 and m.w13.shape[:2] == (4, 64) and m.w2.shape[2] == 32
                              for m in layers)
    finally:
        llm.close()
    with pytest.raises(ValueError, match="1 experts cannot be shared by 2 ranks"):
        LLM(model=tiny_model_dir("qwen3_moe", num_experts=1, num_experts_per_tok=1), num_kv_blocks=48,
            tensor_parallel_size=2, enable_expert_parallel=True)
    assert not torch.distributed.is_initialized()  # refused before any rank started


def test_a_tensor_only_rank_one_loads_is_reported_with_its_name(tiny_model_dir, tmp_path):
    """Expert 6 of 8 lives on rank 1 with expert parallelism: its bad tensor fails that rank alone, and the
    error that reaches the caller is rank 1's, not the broken collective rank 0 then sees."""
    import shutil

    from tests.test_errors import rewrite_tensors
    folder = shutil.copytree(tiny_model_dir("qwen3_moe"), tmp_path / "model")
    name = "model.layers.0.mlp.experts.6.down_proj.weight"
    rewrite_tensors(folder, lambda tensors: tensors.update({name: torch.zeros(64, 31)}))
    with pytest.raises(ExecutorDeadError, match=f"(?s)rank 1 failed.*cannot load checkpoint tensor '{name}'"):
        LLM(model=str(folder), num_kv_blocks=48, tensor_parallel_size=2, enable_expert_parallel=True)
    assert not torch.distributed.is_initialized()


def test_async_scheduling_over_two_ranks(tiny_model_dir):
    folder = tiny_model_dir("qwen3")
    assert_same_generation(generate(folder, tensor_parallel_size=2, async_scheduling=True), generate(folder))


def test_two_ranks_with_an_fp8_kv_cache_calibrate_and_give_the_tokens_of_one(tiny_model_dir):
    """Each rank calibrates its own KV heads' scales over the same random tokens: the cache one rank holds is
    the one rank's slice of the single-rank cache."""
    folder = tiny_model_dir("qwen2", num_key_value_heads=4)
    assert_same_generation(generate(folder, tensor_parallel_size=2, kv_cache_dtype="fp8"),
                           generate(folder, kv_cache_dtype="fp8"))


def forced_logprobs(sequence: list[int], **args) -> list[dict]:
    llm = LLM(model=None, num_kv_blocks=48, dtype="float32", **args)
    try:
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
        return llm.generate([sequence], params, use_tqdm=False)[0].prompt_logprobs[1:]
    finally:
        llm.close()


def test_fp8_weights_over_two_ranks_stay_as_close_to_the_model_as_one_rank(smollm2_path):
    """quantization="fp8" quantizes each rank's slice: a row-parallel slice's channels and a token's activations
    are scaled over the rank's half of the row, so two ranks round differently from one, but no worse.
    Teacher-forced over 48 tokens SmolLM2 (float32, one rank) generates: how often its greedy token stays the
    FP8 model's top-1 and the largest change of its logprob (measured: one rank 0.94 and 0.54, two ranks 0.96
    and 0.74; two ranks unquantized 1.0 and 1e-5)."""
    llm = LLM(model=None, num_kv_blocks=48, dtype="float32")
    try:
        output = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=48,
                                                                            ignore_eos=True), use_tqdm=False)[0]
    finally:
        llm.close()
    sequence = output.prompt_token_ids + output.outputs[0].token_ids
    generated = range(len(output.prompt_token_ids) - 1, len(sequence) - 1)
    reference = forced_logprobs(sequence)

    def agreement(**args) -> tuple[float, float]:
        forced = forced_logprobs(sequence, quantization="fp8", **args)
        top1 = sum(forced[i][sequence[i + 1]].rank == 1 for i in generated) / len(generated)
        return top1, max(abs(forced[i][sequence[i + 1]].logprob - reference[i][sequence[i + 1]].logprob)
                         for i in generated)
    (one_top1, one_error), (two_top1, two_error) = agreement(), agreement(tensor_parallel_size=2)
    assert two_top1 >= min(one_top1, 0.9) and two_error < max(2 * one_error, 1.0), (one_top1, one_error,
                                                                                     two_top1, two_error)


def test_smollm2_split_over_two_ranks():
    # 9 heads over 3 KV heads: rank 0 takes 2 KV heads (6 q heads), rank 1 takes 1 (3 q heads)
    prompts = ["The capital of France is", "Once upon a time"]
    assert_same_generation(generate(None, prompts, tensor_parallel_size=2), generate(None, prompts))


def test_torchrun_joins_its_process_group(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("qwen3")
    script = tmp_path / "tp.py"
    script.write_text(textwrap.dedent(f"""
        import json, os
        from wde import LLM, SamplingParams
        llm = LLM(model={folder!r}, num_kv_blocks=48, tensor_parallel_size=2)
        # only rank 0 gets here: the other rank served its steps inside LLM() and ended with the engine
        outputs = llm.generate({PROMPTS!r}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
        json.dump([o.outputs[0].token_ids for o in outputs], open({str(tmp_path / 'out.json')!r}, "w"))
        llm.close()
    """))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)],
                   check=True, timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()})
    expected = [c.token_ids for c in generate(folder)[len(PROMPTS):]]  # the completions without logprobs
    assert json.loads((tmp_path / "out.json").read_text()) == expected


class FailingOnRankOne(DecodingWorker):
    def launch(self, model_input):  # every step comes through here, synchronous (execute_model) or not
        from wde.core.parallel.distributed import get_tp_rank
        if get_tp_rank() == 1 and (model_input.input_ids == 13).any():
            raise RuntimeError("rank one cannot read token 13")
        return super().launch(model_input)


class FailingWorkflow(ChatWorkflow):
    Worker = f"{__name__}:FailingOnRankOne"


class RankZeroCannotBuild(DecodingWorker):
    def __init__(self, config, components):
        from wde.core.parallel.distributed import get_tp_rank
        if get_tp_rank() == 0:
            raise RuntimeError("rank zero cannot build its worker")
        super().__init__(config, components)


class RankZeroFailingWorkflow(ChatWorkflow):
    Worker = f"{__name__}:RankZeroCannotBuild"


def test_a_rank_zero_that_cannot_build_raises_and_leaves_no_group_or_process(tiny_model_dir, monkeypatch):
    from wde.core.parallel import multiproc_executor
    started = []
    real = multiproc_executor.WorkerProcesses.__init__
    monkeypatch.setattr(multiproc_executor.WorkerProcesses, "__init__",
                        lambda self, *args: started.append(self) or real(self, *args))
    with pytest.raises(RuntimeError, match="rank zero cannot build its worker"):
        LLM(model=tiny_model_dir("qwen3"), num_kv_blocks=48, tensor_parallel_size=2,
            workflow=f"{__name__}:RankZeroFailingWorkflow")
    assert not torch.distributed.is_initialized()
    assert wait_gone([p.pid for p in started[0].processes])
    llm = LLM(model=tiny_model_dir("qwen3"), num_kv_blocks=48, tensor_parallel_size=2)  # the next engine starts
    assert generate_ok(llm)
    llm.close()


def test_a_rank_that_raises_makes_generate_raise_and_leaves_no_process(tiny_model_dir):
    llm = LLM(model=tiny_model_dir("qwen3"), num_kv_blocks=48, tensor_parallel_size=2,
              workflow=f"{__name__}:FailingWorkflow")
    pids = [p.pid for p in llm.engine.executor.workers.processes]
    assert generate_ok(llm)
    start = time.monotonic()
    with pytest.raises(ExecutorDeadError, match="(?s)rank 1 failed.*rank one cannot read token 13"):
        llm.generate([[5, 13, 6]], GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 15
    assert wait_gone(pids)
    llm.engine.scheduler.abort_request(next(iter(llm.engine.scheduler.requests)))  # the dead step's request


def generate_ok(llm: LLM) -> bool:
    return len(llm.generate([[5, 6]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 10


def process_groups_held_by(root: object) -> list:
    """The process groups reachable from `root` through objects' attributes and containers."""
    seen, stack, groups = set(), [root], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.distributed.ProcessGroup):
            groups.append(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__.startswith("wde"):
            stack.extend(vars(obj).values())
    return groups


def test_workers_stop_on_close_and_on_garbage_collection(tiny_model_dir):
    llm = LLM(model=tiny_model_dir("qwen3"), num_kv_blocks=48, tensor_parallel_size=2)
    pids = [p.pid for p in llm.engine.executor.workers.processes]
    assert generate_ok(llm)
    assert process_groups_held_by([llm, {"world": torch.distributed.group.WORLD}])  # the walk finds a group
    llm.close()
    assert wait_gone(pids)
    # a group object kept past close is freed at interpreter exit, where gloo aborts the process
    assert not process_groups_held_by(llm)
    llm = LLM(model=tiny_model_dir("qwen3"), num_kv_blocks=48, tensor_parallel_size=2)
    pids = [p.pid for p in llm.engine.executor.workers.processes]
    del llm
    gc.collect()
    assert wait_gone(pids)


@pytest.mark.parametrize("ending", ["raise KeyboardInterrupt", "os._exit(9)"])
def test_workers_stop_when_the_engine_process_is_interrupted_or_killed(tiny_model_dir, tmp_path, ending):
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(f"""
        import json, os
        from wde import LLM
        llm = LLM(model={tiny_model_dir('qwen3')!r}, num_kv_blocks=48, tensor_parallel_size=2)
        json.dump([p.pid for p in llm.engine.executor.workers.processes], open({str(tmp_path / 'pids')!r}, "w"))
        {ending}
    """))
    subprocess.run([sys.executable, str(script)], timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()},
                   capture_output=True)
    assert wait_gone(json.loads((tmp_path / "pids").read_text()))


def test_shapes_that_cannot_be_split_are_refused_before_any_process_starts(tiny_model_dir):
    with pytest.raises(ValueError, match="tensor_parallel_size=3 cannot split 4 heads over 2 KV heads"):
        LLM(model=tiny_model_dir("qwen3"), num_kv_blocks=8, tensor_parallel_size=3)
    from wde.core.config import default_embed_model_path
    with pytest.raises(ValueError, match="BertModel does not support tensor parallelism"):
        LLM(model=default_embed_model_path(), tensor_parallel_size=2)


def test_host_tiers_that_fit_one_at_a_time_but_not_together_are_refused_on_every_rank(tiny_model_dir,
                                                                                        monkeypatch):
    """Each rank pins its own host tier: the check counts every rank on the host before any of them pins. Here
    LOCAL_WORLD_SIZE (torchrun's count of ranks on a host) says 400, each tier takes 1/200 of the available
    memory: each fits, together they do not, and both ranks refuse before allocating (the error names it)."""
    from wde.core.kv_cache.host_pool import available_host_memory
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "400")
    gib = available_host_memory() / 200 / 2**30
    with pytest.raises(Exception, match="host tier .* for each of 400 ranks on this host"):
        LLM(model=tiny_model_dir("qwen3"), num_kv_blocks=48, tensor_parallel_size=2, kv_offload_gib=gib,
            enable_prefix_caching=True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two of them fit
    llm = LLM(model=tiny_model_dir("qwen3"), num_kv_blocks=48, tensor_parallel_size=2, kv_offload_gib=gib / 50,
              enable_prefix_caching=True)
    try:
        assert generate_ok(llm)
    finally:
        llm.close()
