"""Data parallelism behind `wde serve`: replicas routed by load and prompt start, two replicas giving one's
tokens, and a replica that dies failing only its own requests (CPU: each replica an engine process)."""
import os
import re
import signal
import threading

import httpx
import pytest
import torch

from tests.served import serve
from tests.test_engine_process import exited, wait_until
from wde.core.config import EngineArgs
from wde.entrypoints.openai.data_parallel import replica_args
from wde.entrypoints.openai.process_engine import start_engines
from wde.entrypoints.openai.routing import AFFINITY_SLACK, ReplicaRouter, prompt_start


def test_the_router_spreads_batches_over_equally_loaded_replicas_and_skips_stopped_ones():
    router = ReplicaRouter()
    assert sorted(router.choose([0, 0, 0], None) for _ in range(3)) == [0, 1, 2]
    assert router.choose([5, 1, 3], None) == 1
    assert {router.choose([None, 7, None], None) for _ in range(4)} == {1}


def test_a_prompt_start_goes_back_to_its_replica_unless_that_one_is_too_busy():
    router = ReplicaRouter()
    start = prompt_start(list(range(300)))
    assert start == prompt_start(list(range(256)) + [9, 9])  # only the first 256 tokens count
    first = router.choose([0, 0], start)
    loads = [0, 0]
    loads[first] = AFFINITY_SLACK  # busier, but within the slack: its prefix cache wins
    assert router.choose(loads, start) == first
    loads[first] = AFFINITY_SLACK + 1  # too busy: the least loaded takes it, and is remembered for it
    assert router.choose(loads, start) == 1 - first
    assert router.choose([0, 0], start) == 1 - first
    assert router.choose([0, 0], start) == 1 - first
    stopped = [None, None]
    stopped[first] = 0
    assert router.choose(stopped, start) == first  # its replica stopped: another takes it


def test_replicas_get_gpus_of_their_own_and_too_few_gpus_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    args = EngineArgs(model="m", data_parallel_size=2, tensor_parallel_size=2)
    one, environment = replica_args(args, 1)
    assert environment == {"CUDA_VISIBLE_DEVICES": "6,7"} and one.data_parallel_size == 1
    on_cpu = args.model_copy(update={"device": "cpu", "tensor_parallel_size": 1})
    assert replica_args(on_cpu, 1)[1] == {}  # CPU replicas share the CPU
    with pytest.raises(ValueError, match="needs 6 GPUs; 4 are visible"):
        replica_args(args.model_copy(update={"data_parallel_size": 3}), 0)
    cpu = on_cpu.model_copy(update={"data_parallel_size": 100_000})
    with pytest.raises(ValueError, match="makes 100000 engine processes on the CPU, more than its"):
        replica_args(cpu, 0)  # refused before any process starts


def test_stopped_replicas_keep_their_counters_in_the_sum_but_not_their_gauges():
    from wde.core.engine.stats import EngineStats, StepTimes, merged_stats
    live = EngineStats(num_running=3, num_prompt_tokens=100, num_generation_tokens=40, prefix_cache_hit_rate=0.5,
                       step_times=StepTimes(num_steps=10))
    stopped = EngineStats(num_running=2, num_prompt_tokens=900, num_generation_tokens=60, prefix_cache_hit_rate=0.1,
                          step_times=StepTimes(num_steps=5))
    merged = merged_stats([live, live], [stopped])
    assert (merged.num_running, merged.num_prompt_tokens, merged.num_generation_tokens) == (6, 1100, 140)
    assert merged.prefix_cache_hit_rate == 0.5 and merged.step_times.num_steps == 25


def test_an_engine_in_process_is_one_replica(tiny_model_dir):
    from wde import LLMEngine
    with pytest.raises(ValueError, match="data_parallel_size=2: replicas run behind LLM"):
        LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), data_parallel_size=2)


def offline(model: str, replicas: int, **kwargs):
    from wde import LLM
    return LLM(model=model, num_kv_blocks=64, max_model_len=1024, data_parallel_size=replicas, **kwargs)


def test_llm_over_two_replicas_gives_the_tokens_of_one_in_input_order(tiny_model_dir):
    from wde import SamplingParams
    model = tiny_model_dir("qwen3")
    # eight prompts of two shared starts: affinity keeps each start on one replica, load spreads the starts
    prompts = [[5 + i % 2] * 20 + [7 + i, 8] for i in range(8)] + ["a text prompt, tokenized by its replica"]
    params = [SamplingParams(temperature=0, max_tokens=6 + i, ignore_eos=True) for i in range(len(prompts))]
    one = offline(model, 1)
    expected = [list(output.outputs[0].token_ids) for output in one.generate(prompts, params, use_tqdm=False)]
    one.close()
    llm = offline(model, 2)
    try:
        assert llm.engine is None and len(llm.replicas.engine.replicas) == 2
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert [list(output.outputs[0].token_ids) for output in outputs] == expected
        assert [len(output.outputs[0].token_ids) for output in outputs] == [6 + i for i in range(len(prompts))]
        assert all(replica.latency.count > 0 for replica in llm.replicas.engine.replicas), "a replica idled"
        stats = llm.get_stats()
        assert stats.num_generation_tokens == sum(6 + i for i in range(len(prompts)))
        assert llm.get_tokenizer().encode("a text prompt") == one.get_tokenizer().encode("a text prompt")
        # a refused prompt names its place in the call, and none of the call runs
        with pytest.raises(ValueError, match="prompt 5: prompt token 0 is 1000000, outside the vocabulary"):
            llm.generate(prompts[:5] + [[10**6]], SamplingParams(max_tokens=2), use_tqdm=False)
        with pytest.raises(TypeError, match="prompt 2: prompt token 0 is"):
            llm.generate(prompts[:2] + [[[1]]], SamplingParams(max_tokens=2), use_tqdm=False)
        assert all(replica.num_open_requests == 0 for replica in llm.replicas.engine.replicas)
        with pytest.raises(ValueError, match="served for 'generate'"):
            llm.embed("not an encoder")
    finally:
        pids = [replica.pid for replica in llm.replicas.engine.replicas]
        llm.close()
    assert all(exited(pid) for pid in pids)


def test_llm_replica_that_dies_fails_only_its_prompts_and_the_next_call_uses_the_others(tiny_model_dir):
    from wde import SamplingParams
    llm = offline(tiny_model_dir("qwen3"), 2)
    replicas = llm.replicas.engine.replicas
    try:
        victim = replicas[1]
        killer = threading.Thread(target=lambda: wait_until(lambda: victim.num_open_requests > 0, 60)
                                  and os.kill(victim.pid, signal.SIGKILL))
        killer.start()
        params = SamplingParams(temperature=0, max_tokens=900, ignore_eos=True)
        outputs = llm.generate([[5 + i, 6, 7] for i in range(4)], params, use_tqdm=False)
        killer.join()
        failed = [output for output in outputs if output.error]
        assert 0 < len(failed) < len(outputs), "the dead replica's prompts fail, the other's finish"
        assert all("replica 1: the engine process exited (killed by SIGKILL)" in output.error
                   and output.internal_error and output.outputs[0].finish_reason == "error" for output in failed)
        assert all(len(output.outputs[0].token_ids) == 900 for output in outputs if not output.error)
        later = llm.generate([[11, 12], [13, 14], [15, 16]], SamplingParams(max_tokens=3, ignore_eos=True),
                             use_tqdm=False)
        assert [len(output.outputs[0].token_ids) for output in later] == [3, 3, 3]
    finally:
        llm.close()


def test_llm_embeds_over_two_replicas_as_over_one(tmp_path):
    from tests.encoder_models import write_encoder
    from wde import LLM
    folder = str(write_encoder(tmp_path / "bert", "bert"))
    texts = [f"text number {i} about replicas" for i in range(7)]
    vectors = []
    for replicas in (1, 2):
        llm = LLM(model=folder, task="embed", data_parallel_size=replicas)
        vectors.append(torch.stack([output.outputs.data for output in llm.embed(texts, use_tqdm=False)]))
        llm.close()
    torch.testing.assert_close(vectors[1], vectors[0], rtol=1e-4, atol=1e-5)


def engine_args(model: str, replicas: int) -> EngineArgs:
    return EngineArgs(model=model, num_kv_blocks=64, max_model_len=1024, disable_log_stats=True,
                      data_parallel_size=replicas)


def completions(url: str, prompts: list[list[int]], max_tokens: int = 8) -> list:
    with httpx.Client(timeout=120) as client:
        return [client.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                                           "temperature": 0, "ignore_eos": True})
                for prompt in prompts]


def test_two_replicas_give_the_tokens_of_one_and_both_serve(tiny_model_dir):
    model = tiny_model_dir("qwen3")
    prompts = [[5 + i, 6, 7 + 2 * i] for i in range(6)]
    for url in serve(start_engines({"tiny": engine_args(model, 1)})):
        one = [answer.json()["choices"][0]["text"] for answer in completions(url, prompts)]
    engines = start_engines({"tiny": engine_args(model, 2)})
    replicas = engines["tiny"].replicas
    for url in serve(engines):
        answers = completions(url, prompts)
        assert [answer.json()["choices"][0]["text"] for answer in answers] == one
        assert all(replica.latency.count > 0 for replica in replicas), "a replica took no request"
        metrics = httpx.get(f"{url}/metrics").text
        assert f'wde_request_latency_seconds_count{{model="tiny"}} {len(prompts)}' in metrics
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_a_replica_that_dies_fails_only_its_requests_and_is_reported(tiny_model_dir):
    engines = start_engines({"tiny": engine_args(tiny_model_dir("qwen3"), 2)})
    replicas = engines["tiny"].replicas
    for url in serve(engines):
        long_answers = []

        def long_request(first_token: int):
            long_answers.append(completions(url, [[first_token, 6, 7]], max_tokens=1000)[0])
        threads = [threading.Thread(target=long_request, args=(token,)) for token in (5, 9)]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: all(replica.num_open_requests == 1 for replica in replicas), 60)
        prompt_tokens = lambda: int(re.search(r"wde_prompt_tokens_total\{[^}]*\} (\d+)",  # noqa: E731
                                              httpx.get(f"{url}/metrics").text).group(1))
        before = prompt_tokens()
        victim = replicas[1].pid
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: not replicas[1].alive, 30)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert "killed by SIGKILL" in health.json()["stopped_replicas"]["tiny/1"]
        later = completions(url, [[11, 12], [13, 14], [15, 16]], max_tokens=4)  # all on the live replica
        assert [answer.status_code for answer in later] == [200, 200, 200]
        assert prompt_tokens() >= before + 6, "a counter of /metrics went down with the replica"
        for thread in threads:
            thread.join(timeout=120)
        codes = sorted(answer.status_code for answer in long_answers)
        assert codes == [200, 503]  # the dead replica's request failed, with why; the other finished
        failed = next(answer for answer in long_answers if answer.status_code == 503)
        assert "replica 1: the engine process exited (killed by SIGKILL)" in failed.json()["error"]["message"]
    assert exited(victim)


def test_an_encoder_over_two_replicas_gives_the_embeddings_of_one(tmp_path):
    from tests.encoder_models import write_encoder
    folder = str(write_encoder(tmp_path / "bert", "bert"))
    texts = [f"text number {i} about replicas" for i in range(6)]
    embeddings = []
    for replicas in (1, 2):
        engines = start_engines({"enc": EngineArgs(model=folder, task="embed", disable_log_stats=True,
                                                   data_parallel_size=replicas)})
        for url in serve(engines):
            answer = httpx.post(f"{url}/v1/embeddings", json={"model": "enc", "input": texts}, timeout=60)
            single = [httpx.post(f"{url}/v1/embeddings", json={"model": "enc", "input": text}, timeout=60)
                      for text in texts]  # one batch a request: spread over the replicas
            embeddings.append([item["embedding"] for item in answer.json()["data"]])
            embeddings.append([s.json()["data"][0]["embedding"] for s in single])
            if replicas == 2:
                assert all(replica.latency.count > 0 for replica in engines["enc"].replicas)
    for other in embeddings[1:]:
        torch.testing.assert_close(torch.tensor(other), torch.tensor(embeddings[0]), rtol=1e-4, atol=1e-5)


SCRIPT_WITHOUT_CLOSE = """
import sys
from wde import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], num_kv_blocks=64, max_model_len=1024, data_parallel_size=2)
    print([r.pid for r in llm.replicas.engine.replicas], flush=True)
    llm.generate([[5, 6], [7, 8]], SamplingParams(max_tokens=2), use_tqdm=False)
    if sys.argv[2] == "raise":
        llm.generate([[5, 6], [10**6]], SamplingParams(max_tokens=2), use_tqdm=False)
"""


@pytest.mark.parametrize("ending", ["end", "raise"])
def test_a_script_that_never_closes_its_llm_still_exits_and_stops_its_replicas(tiny_model_dir, tmp_path, ending):
    import subprocess
    import sys
    script = tmp_path / "script.py"
    script.write_text(SCRIPT_WITHOUT_CLOSE)
    done = subprocess.run([sys.executable, str(script), tiny_model_dir("qwen3"), ending], capture_output=True,
                          text=True, timeout=120, cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == (1 if ending == "raise" else 0), done.stderr[-2000:]
    if ending == "raise":
        assert "prompt 1: prompt token 0 is 1000000" in done.stderr
    pids = eval(done.stdout.strip().splitlines()[-1])
    assert wait_until(lambda: all(exited(pid) for pid in pids), 10)


def test_llm_replicas_stop_when_the_llm_is_collected_and_a_closed_one_says_so(tiny_model_dir):
    import gc
    llm = offline(tiny_model_dir("qwen3"), 2)
    pids = [replica.pid for replica in llm.replicas.engine.replicas]
    del llm
    gc.collect()
    assert wait_until(lambda: all(exited(pid) for pid in pids), 30)
    closed = offline(tiny_model_dir("qwen3"), 2)
    closed.close()
    with pytest.raises(RuntimeError, match="this LLM was closed"):
        closed.generate([[5, 6]], use_tqdm=False)


def test_llm_names_the_first_refused_prompt_and_one_that_cannot_reach_a_replica(tiny_model_dir):
    from wde import SamplingParams
    llm = offline(tiny_model_dir("qwen3"), 2)
    try:
        prompts = [[5, 6], [7, 8], [9, 10], "", [10**6], [11, 12]]  # 3 and 4 go to different replicas
        with pytest.raises(ValueError, match="prompt 3: the prompt is empty"):
            llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
        with pytest.raises(TypeError, match="prompt 2: a prompt must be a str or a list of token ids, not generator"):
            llm.generate([[5, 6], [7, 8], (i for i in range(3))], SamplingParams(max_tokens=2), use_tqdm=False)
        assert all(replica.num_open_requests == 0 for replica in llm.replicas.engine.replicas)
    finally:
        llm.close()


def test_a_replica_killed_just_before_a_call_fails_only_the_prompts_sent_to_it(tiny_model_dir):
    from wde import SamplingParams
    llm = offline(tiny_model_dir("qwen3"), 2)
    try:
        os.kill(llm.replicas.engine.replicas[1].pid, signal.SIGKILL)
        outputs = llm.generate([[5 + i, 6] for i in range(6)], SamplingParams(max_tokens=3, ignore_eos=True),
                               use_tqdm=False)
        assert all("replica 1" in output.error for output in outputs if output.error)
        assert all(len(output.outputs[0].token_ids) == 3 for output in outputs if not output.error)
        assert wait_until(lambda: not llm.replicas.engine.replicas[1].alive, 30)
        later = llm.generate([[9, 9]] * 3, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
        assert [len(output.outputs[0].token_ids) for output in later] == [3, 3, 3]  # all on the live one
    finally:
        llm.close()


def test_an_add_aborted_before_the_engine_answers_leaves_no_open_request(tiny_model_dir):
    import asyncio
    from wde import SamplingParams
    engine = start_engines({"tiny": engine_args(tiny_model_dir("qwen3"), 1)})["tiny"]

    async def add_then_abort():
        requests = [(f"r{i}", [5, 6, 7], SamplingParams(max_tokens=500, ignore_eos=True)) for i in range(50)]
        adding = asyncio.ensure_future(engine.add_requests(requests))
        await asyncio.sleep(0)  # the add is sent; its answer has not come back
        engine.abort([request_id for request_id, _, _ in requests])
        await adding
    try:
        asyncio.run(add_then_abort())
        assert wait_until(lambda: engine.num_open_requests == 0, 5), engine.num_open_requests
    finally:
        engine.stop()
