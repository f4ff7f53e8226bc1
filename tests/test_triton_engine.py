"""The whole engine on the Triton attention backend gives the torch backend's tokens (CPU: interpreted)."""
import pytest

from tests.conftest import run_to_completion
from tests.test_parity_random import random_prompts
from wde import LLMEngine, SamplingParams

# float32 as torch computes it, in the interpreter and on a GPU (tl.dot multiplies float32 inputs exactly there)
LOGPROB_TOLERANCE = 1e-4


def generate(folder: str, backend: str) -> list:
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=32, attention_backend=backend, dtype="float32",
                                        max_num_batched_tokens=32, enable_prefix_caching=True)
    prompts = random_prompts([21, 3, 40], seed=7) + [random_prompts([21], seed=7)[0] + [9]]  # a prefix hit
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                          logprobs=0))
    outputs = run_to_completion(engine)
    return [outputs[str(i)].outputs[0] for i in range(len(prompts))]


# qwen3: the per-head norms in the fused rotation; mistral: a window shorter than the chunks and the cached prefix;
# gemma2: local and global layers, soft-capped scores; gemma3: (1 + weight) head norms in the fused rotation;
# qwen2 (head_dim 8) and phi3 (24, LongRoPE): heads the kernels pad to 16 and 32
PHI3_HEADS_OF_24 = {"hidden_size": 96, "rope_parameters": {
    "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
    "original_max_position_embeddings": 1024, "short_factor": [1.0] * 12, "long_factor": [2.0] * 12}}


@pytest.mark.parametrize("shape,overrides", [("qwen2", {}), ("qwen3", {}), ("mistral", {"sliding_window": 5}),
                                             ("gemma2", {"sliding_window": 5}), ("gemma3", {}),
                                             ("phi3", PHI3_HEADS_OF_24)])
def test_triton_backend_matches_torch_backend(tiny_model_dir, shape, overrides):
    folder = tiny_model_dir(shape, **overrides)
    triton, reference = generate(folder, "triton"), generate(folder, "torch")
    assert [c.token_ids for c in triton] == [c.token_ids for c in reference]
    for a, b in zip(triton, reference):
        for step_a, step_b, token in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(step_a[token].logprob - step_b[token].logprob) < LOGPROB_TOLERANCE
