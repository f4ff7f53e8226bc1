"""quantization="fp8": the projections' weights in float8 per output channel, activations per token, through the
CPU reference path (the numbers the GPU's scaled matmul computes). SmolLM2 is measured against its float32 self
over 256 generated tokens, teacher-forced: how often the float32 model's greedy token stays the top-1, and how far
its logprob moves."""
import torch

from tests.conftest import run_to_completion
from tests.test_parity_random import random_prompts
from wde import LLMEngine, SamplingParams
from wde.core.layers.fp8 import FP8, FP8_MAX, fp8_matmul, quantize_rows
from wde.core.layers.linear import MergedColumnParallelLinear, RowParallelLinear

NUM_TOKENS = 256


def greedy_sequence(folder: str, prompt: list[int], **engine_args) -> list[int]:
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=64, dtype="float32", **engine_args)
    engine.add_request("g", prompt, SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True))
    return prompt + run_to_completion(engine)["g"].outputs[0].token_ids


def teacher_forced(folder: str, sequence: list[int], **engine_args) -> list[dict]:
    """Each position's {token: Logprob} (the token there and the top-1) given the tokens before it."""
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=64, dtype="float32", **engine_args)
    engine.add_request("t", sequence, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    return run_to_completion(engine)["t"].prompt_logprobs[1:]


def agreement_and_error(folder: str, prompt: list[int], **engine_args) -> tuple[float, float]:
    sequence = greedy_sequence(folder, prompt, **engine_args)
    reference, quantized = teacher_forced(folder, sequence), teacher_forced(folder, sequence, quantization="fp8")
    generated = range(len(prompt) - 1, len(sequence) - 1)  # positions whose next token the model generated
    tokens = sequence[1:]
    top1 = sum(quantized[i][tokens[i]].rank == 1 for i in generated) / len(generated)
    error = max(abs(quantized[i][tokens[i]].logprob - reference[i][tokens[i]].logprob) for i in generated)
    return top1, error


def test_fp8_keeps_smollm2s_greedy_tokens(smollm2_path):
    top1, error = agreement_and_error(smollm2_path, random_prompts([24], seed=5)[0])
    # measured: top-1 agreement 1.0 over the 256 tokens, max logprob error 0.41
    assert top1 >= 0.98 and error < 0.6, (top1, error)


def test_an_fp8_matmul_is_within_e4m3s_rounding():
    """3 mantissa bits: a product of rows rounded to float8 stays within a few percent of the exact one (tiny
    random models, whose greedy margins are narrower than that, are not a fair judge: SmolLM2 is)."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(8, 64), torch.randn(192, 64) * 0.2, torch.randn(192)
    x[3] = 0  # a row of zeros: a finite scale, zeros out
    quantized, scale = quantize_rows(weight)
    out, exact = fp8_matmul(x, quantized, scale, bias), x @ weight.t() + bias
    assert torch.isfinite(out).all() and torch.equal(out[3], bias)
    assert (out - exact).norm() / exact.norm() < 0.05


def test_the_projections_hold_float8_weights_scaled_per_output_channel(tiny_model_dir):
    engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=8, quantization="fp8")
    model = engine.executor.worker.model
    projections = [m for m in model.modules() if isinstance(m, (MergedColumnParallelLinear, RowParallelLinear))]
    assert projections and all(m.weight.dtype == FP8 and m.weight_scale.shape == (m.weight.shape[0], 1)
                               for m in projections)
    # each row's largest weight is the largest float8 value: the scale is the row's amax / 448
    assert all(torch.allclose(m.weight.float().abs().amax(dim=1), torch.full((m.weight.shape[0],), FP8_MAX))
               for m in projections)
    assert model.lm_head.weight.dtype == torch.float32  # the head (and embeddings) stay as they were
