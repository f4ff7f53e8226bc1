"""Random-weight Llama / Qwen2 / Qwen3 and MoE (Qwen3-MoE, Qwen2-MoE, Mixtral) shapes: greedy tokens and their
logprobs against transformers (float32)."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import run_to_completion
from tests.tiny_models import VOCAB_SIZE
from wde import LLMEngine, SamplingParams

NUM_TOKENS = 32
VARIANTS = [("qwen3", {}), ("qwen2", {}), ("qwen2", {"tie_word_embeddings": True}), ("llama", {}),
            ("qwen3", {"attention_bias": True, "tie_word_embeddings": False}), ("qwen3_moe", {}),
            ("qwen3_moe", {"num_experts_per_tok": 8, "norm_topk_prob": False, "mlp_only_layers": []}),
            ("qwen2_moe", {}), ("qwen2_moe", {"shared_expert_intermediate_size": 0}), ("mixtral", {}),
            ("mistral", {}), ("mistral", {"sliding_window": None, "head_dim": 32}), ("phi3", {}),
            # windows shorter than the prompts and generations, crossing blocks and the 64-token prefill chunks
            ("mistral", {"sliding_window": 24}), ("mixtral", {"sliding_window": 7}), ("phi3", {"sliding_window": 40}),
            ("gemma2", {}), ("gemma2", {"attn_logit_softcapping": None, "final_logit_softcapping": None,
                                        "tie_word_embeddings": False}), ("gemma3", {}),
            ("phi3", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
            ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 1.0}})]


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB_SIZE) for _ in range(n)] for n in lengths]


def reference_logprobs(hf_model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """transformers' log-probabilities for each generated position, given the same tokens before it."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + generated])).logits[0].float()
    return logits.log_softmax(-1)[len(prompt) - 1:-1]


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("shape,overrides", VARIANTS, ids=[f"{s}-{o}" for s, o in VARIANTS])
def test_greedy_tokens_and_logprobs_match_transformers(tiny_model_dir, shape, overrides, async_scheduling):
    folder = tiny_model_dir(shape, **overrides)
    # 4 sequences at a time and 64 tokens a step: prompts queue, join mid-flight and prefill in chunks
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=96, max_num_seqs=4,
                                        max_num_batched_tokens=64, async_scheduling=async_scheduling)
    prompts = random_prompts([5, 17, 40, 100, 3, 64])
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=2)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs = run_to_completion(engine)

    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for i, prompt in enumerate(prompts):
        completion = outputs[str(i)].outputs[0]
        assert len(completion.token_ids) == NUM_TOKENS and completion.finish_reason == "length"
        reference = reference_logprobs(hf_model, prompt, completion.token_ids)
        assert completion.token_ids == reference.argmax(-1).tolist(), f"prompt {i} diverged from transformers"
        ours = torch.tensor([step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)])
        theirs = reference.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        assert (ours - theirs).abs().max() < 1e-3
        assert all(step[token].rank == 1 for step, token in zip(completion.logprobs, completion.token_ids))
