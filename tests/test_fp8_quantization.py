"""FP8 on the CPU: quantization="fp8" (the projections' weights in float8 per output channel, activations per
token, through the reference path of the numbers the GPU's scaled matmul computes) and kv_cache_dtype="fp8" (K
and V stored as float8 over per-head scales). SmolLM2 is measured against its float32 self over 256 generated tokens, teacher-forced:
how often the float32 model's greedy token stays the top-1, and how far its logprob moves."""
import pytest
import torch

from tests.conftest import run_to_completion
from tests.test_parity_random import random_prompts
from wde import LLMEngine, SamplingParams
from wde.core.layers.fp8 import FP8, FP8_MAX, fp8_matmul, quantize_rows
from wde.core.layers.linear import MergedColumnParallelLinear, RowParallelLinear

NUM_TOKENS = 256


def greedy_sequence(folder: str, prompt: list[int], dtype: str = "float32", **engine_args) -> list[int]:
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=64, dtype=dtype, **engine_args)
    engine.add_request("g", prompt, SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True))
    return prompt + run_to_completion(engine)["g"].outputs[0].token_ids


def teacher_forced(folder: str, sequence: list[int], dtype: str = "float32", **engine_args) -> list[dict]:
    """Each position's {token: Logprob} (the token there and the top-1) given the tokens before it."""
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=64, dtype=dtype, **engine_args)
    engine.add_request("t", sequence, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    return run_to_completion(engine)["t"].prompt_logprobs[1:]


def agreement_and_error(folder: str, prompt: list[int], dtype: str = "float32", **fp8_args) -> tuple[float, float]:
    """Over the tokens the unquantized model generates: how often they stay the FP8 model's top-1, and the
    largest change of their logprob."""
    sequence = greedy_sequence(folder, prompt, dtype)
    reference, quantized = teacher_forced(folder, sequence, dtype), teacher_forced(folder, sequence, dtype, **fp8_args)
    generated = range(len(prompt) - 1, len(sequence) - 1)  # positions whose next token the model generated
    tokens = sequence[1:]
    top1 = sum(quantized[i][tokens[i]].rank == 1 for i in generated) / len(generated)
    error = max(abs(quantized[i][tokens[i]].logprob - reference[i][tokens[i]].logprob) for i in generated)
    return top1, error


def test_fp8_weights_keep_smollm2s_greedy_tokens(smollm2_path):
    top1, error = agreement_and_error(smollm2_path, random_prompts([24], seed=5)[0], quantization="fp8")
    # measured: top-1 agreement 1.0 over the 256 tokens, max logprob error 0.41
    assert top1 >= 0.98 and error < 0.6, (top1, error)


def test_an_fp8_kv_cache_keeps_smollm2s_greedy_tokens(smollm2_path):
    top1, error = agreement_and_error(smollm2_path, random_prompts([24], seed=5)[0], kv_cache_dtype="fp8")
    # measured (torch backend, calibrated scales): top-1 agreement 1.0 over the 256 tokens, max logprob error
    # 0.19 (0.42 unscaled, before the scales)
    assert top1 >= 0.98 and error < 0.6, (top1, error)


# measured over 256 tokens: (top-1 agreement, max logprob error). The random shapes' weights are drawn wide
# (tests/tiny_models.py) so their exact-parity tests win by clear margins; that makes every logit far more
# sensitive to a rounding than a trained model's, so FP8 moves them further than it moves SmolLM2's (above).
RANDOM_SHAPE_BOUNDS = {("llama", "quantization"): (0.55, 4.14), ("llama", "kv_cache_dtype"): (0.75, 2.40),
                       ("qwen2", "quantization"): (0.69, 3.54), ("qwen2", "kv_cache_dtype"): (0.84, 2.25),
                       ("qwen3", "quantization"): (0.75, 0.89), ("qwen3", "kv_cache_dtype"): (0.89, 0.47)}


@pytest.mark.parametrize("shape,argument", list(RANDOM_SHAPE_BOUNDS))
def test_fp8_on_random_llama_and_qwen_shapes_within_the_measured_bounds(tiny_model_dir, shape, argument):
    top1, error = agreement_and_error(tiny_model_dir(shape), random_prompts([24], seed=5)[0], **{argument: "fp8"})
    measured_top1, measured_error = RANDOM_SHAPE_BOUNDS[shape, argument]
    assert top1 >= measured_top1 - 0.05 and error < measured_error * 1.25, (top1, error)


def test_an_fp8_kv_cache_holds_more_blocks_and_serves_prefix_hits(tiny_model_dir):
    """The same memory holds 4x the float32 cache's blocks (but for rounding); a prefix hit reads the float8
    blocks another request wrote, and gives the tokens of computing them again. (The Triton kernels' reading
    of a float8 cache is tested against the reference in tests/test_kernels_attention.py.)"""
    folder = tiny_model_dir("qwen3")
    budget = {"kv_cache_memory_bytes": 1 << 20}
    sizes = [LLMEngine.from_engine_args(model=folder, kv_cache_dtype=dtype, **budget).kv_cache_manager.num_blocks
             for dtype in ("auto", "fp8")]
    assert 4 * sizes[0] <= sizes[1] < 4 * (sizes[0] + 1)
    prompts = random_prompts([40], seed=3) * 2 + random_prompts([7], seed=4)

    def generate(**args) -> list[list[int]]:
        engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=64, kv_cache_dtype="fp8", **args)
        tokens = []
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
            tokens.append(run_to_completion(engine)[str(i)].outputs[0].token_ids)
        return tokens, engine
    computed, _ = generate()
    cached, engine = generate(enable_prefix_caching=True)
    assert cached == computed and engine.kv_cache_manager.prefix_cache_hit_rate > 0.3
