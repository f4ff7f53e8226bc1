"""The peer: Hugging Face transformers on the same GPU, random bf16 weights of the same shapes.

W1 and W2 use transformers' continuous batching (`generate_batch` with paged attention), which takes one
max_new_tokens for all requests, so each request gets the mean output length (the total output count matches
the workload's). W5 is plain `generate` at batch 1 with SDPA attention.
"""
import time

import torch

from benchmarks.model_folder import hf_config


def causal_lm(shape_name: str, attn_implementation: str):
    from transformers import AutoModelForCausalLM
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(hf_config(shape_name), dtype=torch.bfloat16,
                                                attn_implementation=attn_implementation).eval()


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def continuous_batching(shape_name: str, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """Output tokens, seconds and requests for one run of generate_batch over all prompts."""
    from transformers.generation import GenerationConfig
    model = causal_lm(shape_name, "paged|sdpa")
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    results, seconds = timed(lambda: model.generate_batch(inputs=prompts, generation_config=config,
                                                          progress_bar=False))
    out_tokens = sum(len(r.generated_tokens) for r in results.values())
    del model
    torch.cuda.empty_cache()
    return {"out_tokens": out_tokens, "seconds": seconds, "requests": len(prompts)}


def single_stream(shape_name: str, prompt: list[int], new_tokens: int) -> dict:
    model = causal_lm(shape_name, "sdpa")
    ids = torch.tensor([prompt], device="cuda")

    def generate(n):
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    generate(16)  # warm-up
    out, seconds = timed(lambda: generate(new_tokens))
    del model
    torch.cuda.empty_cache()
    return {"tok_per_s": round((out.shape[1] - len(prompt)) / seconds, 1), "seconds": round(seconds, 2)}
