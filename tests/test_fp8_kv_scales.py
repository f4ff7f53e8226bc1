"""The scales of a float8 KV cache (wde/core/kv_cache/kv_scales.py): read from a checkpoint's k_scale / v_scale
(per layer or per KV head), else calibrated at start-up from each head's amax, and applied by the kernels.

The calibration test uses a model whose K and V are ~1000x past float8's largest value yet computes exactly
what its unscaled original computes (k_proj and v_proj times 1000, q_proj and o_proj over it): unscaled, the cache
saturates and the model's tokens change; scaled, they stay."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_to_completion
from tests.test_fp8_quantization import greedy_sequence, teacher_forced
from tests.test_parity_random import random_prompts
from wde import LLMEngine, SamplingParams
from wde.core import worker
from wde.core.kv_cache import kv_scales

BIG = 1000.0


def qwen2_of_4_layers(tiny_model_dir) -> str:
    return tiny_model_dir("qwen2", num_hidden_layers=4, layer_types=["full_attention"] * 4)


def worker_scales(folder: str, **args) -> torch.Tensor:
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=16, kv_cache_dtype="fp8", dtype="float32",
                                        **args)
    return engine.executor.worker.kv_scales


def with_tensors(source: str, target, extra: dict[str, torch.Tensor], scale_kv_by: float = 1.0) -> str:
    """A copy of the model folder `source` with `extra` tensors added to its weights, K and V projections times
    scale_kv_by and the projections that read them (q_proj against K, o_proj after V) over it."""
    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    for name in list(weights):
        if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            weights[name] = weights[name] * scale_kv_by
        elif name.endswith(("q_proj.weight", "q_proj.bias", "o_proj.weight")):
            weights[name] = weights[name] / scale_kv_by
    save_file({**weights, **extra}, target / "model.safetensors", metadata={"format": "pt"})
    return str(target)


def test_a_checkpoints_scales_per_layer_and_per_head_are_read(tiny_model_dir, tmp_path):
    """4 layers of 2 KV heads, carrying the four published spellings, scalars and per head."""
    folder = qwen2_of_4_layers(tiny_model_dir)
    extra = {
        "model.layers.0.self_attn.k_scale": torch.tensor(0.5), "model.layers.0.self_attn.v_scale": torch.tensor(2.0),
        "model.layers.1.self_attn.k_proj.k_scale": torch.tensor([0.25, 0.75]),
        "model.layers.1.self_attn.v_proj.v_scale": torch.tensor([1.5, 3.0]),
        "model.layers.2.self_attn.kv_scale": torch.tensor([0.125]),
        "model.layers.3.self_attn.k_proj.output_scale": torch.tensor(4.0),
        "model.layers.3.self_attn.v_proj.output_scale": torch.tensor(5.0),
    }
    scales = worker_scales(with_tensors(folder, tmp_path / "scaled", extra))
    expected = torch.tensor([[[0.5, 0.5], [2.0, 2.0]], [[0.25, 0.75], [1.5, 3.0]],
                             [[0.125, 0.125], [0.125, 0.125]], [[4.0, 4.0], [5.0, 5.0]]])
    assert torch.equal(scales, expected)
    # a cache of the model's dtype ignores them (ones, never read), and so does the model itself
    engine = LLMEngine.from_engine_args(model=str(tmp_path / "scaled"), num_kv_blocks=16, dtype="float32")
    assert torch.equal(engine.executor.worker.kv_scales, torch.ones(4, 2, 2))


@pytest.mark.parametrize("extra,message", [
    ({"model.layers.0.self_attn.k_scale": torch.tensor(-1.0)}, "layers.0.self_attn.k_scale: .*positive"),
    ({"model.layers.1.self_attn.v_scale": torch.tensor(float("nan"))}, "layers.1.self_attn.v_scale: .*finite"),
    ({"model.layers.0.self_attn.k_scale": torch.ones(3)}, r"k_scale: 3 KV cache scales, expected 1 or one per"),
    ({"model.layers.9.self_attn.kv_scale": torch.tensor(1.0)}, "layer 9 of a model of 4 layers"),
    ({"model.layers.0.self_attn.k_scale": torch.tensor(1.0)}, "miss layer 0 V, layer 1 K"),
])
def test_bad_checkpoint_scales_fail_naming_the_tensor(tiny_model_dir, tmp_path, extra, message):
    folder = with_tensors(qwen2_of_4_layers(tiny_model_dir), tmp_path / "bad", extra)
    complete = {f"model.layers.{i}.self_attn.kv_scale": torch.tensor(1.0) for i in range(4)}
    if "miss" not in message:  # every other scale there, so the bad one is what fails
        folder = with_tensors(qwen2_of_4_layers(tiny_model_dir), tmp_path / "bad2", {**complete, **extra})
    with pytest.raises(ValueError, match=message):
        worker_scales(folder)


def test_calibrated_scales_follow_each_heads_amax(tiny_model_dir, tmp_path):
    """No scales in the checkpoint: K and V ~1000x larger give scales ~1000x larger, head by head."""
    folder = qwen2_of_4_layers(tiny_model_dir)
    plain = worker_scales(folder)
    big = worker_scales(with_tensors(folder, tmp_path / "big", {}, scale_kv_by=BIG))
    assert plain.shape == (4, 2, 2) and (plain > 0).all() and (plain != 1).any()
    torch.testing.assert_close(big, plain * BIG, rtol=1e-4, atol=0)
    # FP8_MAX / HEADROOM is where each head's calibration amax lands
    assert ((big * kv_scales.FP8_MAX / kv_scales.HEADROOM) > 4 * BIG / 10).all()


def test_calibration_makes_a_model_whose_kv_saturate_float8_as_good_as_its_original(tiny_model_dir, tmp_path,
                                                                                      monkeypatch):
    """Teacher-forced over 64 tokens the float32 original generates: the ~1000x model with calibrated scales
    stores the original's float8 values (its scales are ~1000x the original's), so its top-1 agreement and logprob
    error are the original's; with scales of one (what a cache without them did) K and V saturate at 448 and
    almost no token survives. (The tiny random model is itself fragile under float8 rounding: measured top-1
    0.75 for both, max logprob error 1.86; SmolLM2's figures are in tests/test_fp8_quantization.py.)"""
    original = qwen2_of_4_layers(tiny_model_dir)
    big = with_tensors(original, tmp_path / "big", {}, scale_kv_by=BIG)
    prompt = random_prompts([12], seed=2)[0]
    sequence = greedy_sequence(original, prompt)[:len(prompt) + 64]
    reference = teacher_forced(original, sequence)
    generated = range(len(prompt) - 1, len(sequence) - 1)

    def agreement(folder: str) -> tuple[float, float]:
        forced = teacher_forced(folder, sequence, kv_cache_dtype="fp8")
        top1 = sum(forced[i][sequence[i + 1]].rank == 1 for i in generated) / len(generated)
        error = max(abs(forced[i][sequence[i + 1]].logprob - reference[i][sequence[i + 1]].logprob)
                    for i in generated)
        return top1, error
    (top1, error), (big_top1, big_error) = agreement(original), agreement(big)
    assert big_top1 == top1 and big_error == pytest.approx(error, abs=0.05), (top1, error, big_top1, big_error)
    monkeypatch.setattr(worker, "scales_from_amax", lambda amax: torch.ones_like(amax))
    unscaled_top1, unscaled_error = agreement(big)
    assert unscaled_top1 < 0.3 and unscaled_error > 5 * error, (unscaled_top1, unscaled_error)


def test_the_triton_backend_applies_the_scales_as_the_torch_backend_does(tiny_model_dir, tmp_path):
    """The ~1000x model on a float8 cache: the fused rotation's store, the decode and the prefill kernels (with a
    prefix hit and chunked prefill) give the torch backend's tokens and logprobs."""
    folder = with_tensors(qwen2_of_4_layers(tiny_model_dir), tmp_path / "big", {}, scale_kv_by=BIG)
    prompts = random_prompts([21, 40], seed=7) + [random_prompts([21], seed=7)[0] + [9]]

    def generate(backend: str) -> list:
        engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=32, attention_backend=backend,
                                            dtype="float32", kv_cache_dtype="fp8", max_num_batched_tokens=32,
                                            enable_prefix_caching=True)
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                              logprobs=0))
        outputs = run_to_completion(engine)
        return [outputs[str(i)].outputs[0] for i in range(len(prompts))]
    triton, reference = generate("triton"), generate("torch")
    assert [c.token_ids for c in triton] == [c.token_ids for c in reference]
    for a, b in zip(triton, reference):
        for step_a, step_b, token in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(step_a[token].logprob - step_b[token].logprob) < 1e-3
