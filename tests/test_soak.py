"""500 requests of random lengths through a KV cache small enough to force preemption again and again."""
import random

from tests.conftest import run_to_completion
from tests.test_parity_random import random_prompts
from wde import LLMEngine, RequestOutputKind, SamplingParams

NUM_REQUESTS = 500


def test_soak_every_request_completes_as_if_alone(tiny_model_dir):
    folder = tiny_model_dir("qwen2")
    rng = random.Random(31)
    prompts = [random_prompts([rng.randint(1, 48)], seed=5000 + i)[0] for i in range(NUM_REQUESTS)]
    params = [SamplingParams(temperature=0 if i % 3 else 1.0, seed=i, max_tokens=rng.randint(1, 24),
                             ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY) for i in range(NUM_REQUESTS)]

    def run(**engine_args):
        engine = LLMEngine.from_engine_args(model=folder, block_size=16, **engine_args)
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), prompt, p)
        outputs = run_to_completion(engine)
        return [outputs[str(i)].outputs[0] for i in range(NUM_REQUESTS)], engine

    alone, _ = run(num_kv_blocks=8, max_num_seqs=1)
    together, engine = run(num_kv_blocks=24, max_num_seqs=64, max_num_batched_tokens=128)
    assert engine.get_stats().num_preemptions > 50
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert all(len(c.token_ids) == p.max_tokens and c.finish_reason == "length" for c, p in zip(together, params))
