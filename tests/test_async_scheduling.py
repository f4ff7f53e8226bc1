"""Async scheduling (the next step launched before the last one's outputs are made) changes nothing a request
sees: tokens, text, stops, log-probabilities, penalties and aborts come out as in the synchronous engine."""
from tests.conftest import run_to_completion
from tests.test_smollm2 import PROMPTS
from wde import LLM, LLMEngine, SamplingParams

MAX_TOKENS = 24


def generate(params: list[SamplingParams], **engine_args) -> list:
    llm = LLM(max_num_seqs=8, num_kv_blocks=64, **engine_args)
    try:
        return [o.outputs for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        llm.close()


def stopping_params() -> list[SamplingParams]:
    """Stops that fire mid-generation: strings and token ids taken from an unstopped greedy run."""
    free = generate([SamplingParams(temperature=0, max_tokens=MAX_TOKENS)] * len(PROMPTS))
    params = []
    for i, outputs in enumerate(free):
        text, ids = outputs[0].text, outputs[0].token_ids
        if i % 4 == 0 and len(text) > 20:
            params.append(SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[text[12:16]]))
        elif i % 4 == 1 and len(ids) > 8:
            params.append(SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[ids[6]], logprobs=2))
        elif i % 4 == 2:  # the sampler reads the output so far: async waits for the token in flight
            params.append(SamplingParams(temperature=0.8, seed=i, max_tokens=MAX_TOKENS, min_tokens=5,
                                         presence_penalty=0.5, repetition_penalty=1.3))
        else:
            params.append(SamplingParams(n=2, temperature=0.9, seed=i, max_tokens=MAX_TOKENS - i, logprobs=1))
    return params


def test_outputs_equal_the_synchronous_engine_with_stops_penalties_and_logprobs():
    params = stopping_params()
    sync, overlapped = generate(params), generate(params, async_scheduling=True)
    assert sum(c.finish_reason == "stop" for outputs in sync for c in outputs) >= 3
    for a, b in zip(sync, overlapped):
        for x, y in zip(a, b):
            assert (x.token_ids, x.text, x.finish_reason, x.stop_reason) == \
                   (y.token_ids, y.text, y.finish_reason, y.stop_reason)
            for step_x, step_y in zip(x.logprobs or [], y.logprobs or []):
                assert step_x.keys() == step_y.keys()
                assert all(abs(step_x[t].logprob - step_y[t].logprob) < 1e-4 for t in step_x)


def test_an_abort_while_its_step_is_in_flight_leaves_the_others_unchanged():
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def run(async_scheduling: bool, abort_after: int | None) -> dict:
        engine = LLMEngine.from_engine_args(num_kv_blocks=64, max_num_seqs=8, async_scheduling=async_scheduling)
        for i, prompt in enumerate(PROMPTS[:4]):
            engine.add_request(str(i), prompt, params)
        if abort_after is not None:
            for _ in range(abort_after):
                assert not any(o.request_id == "1" and o.finished for o in engine.step())
            assert engine.stepper.in_flight is not None  # a step is on its way while the caller aborts
            assert engine.abort_request("1")
        outputs = run_to_completion(engine)
        return {rid: o.outputs[0].token_ids for rid, o in outputs.items()}

    expected = run(async_scheduling=False, abort_after=None)
    overlapped = run(async_scheduling=True, abort_after=4)
    assert "1" not in overlapped
    assert overlapped == {rid: ids for rid, ids in expected.items() if rid != "1"}
