"""The peer: Hugging Face transformers on the same GPU, random bf16 weights of the same shapes.

W1, W2 and W7 use transformers' continuous batching (`generate_batch` with paged attention), which takes one
max_new_tokens for all requests, so each request gets the mean output length (the total output count matches
the workload's). W5 is plain `generate` at batch 1 with SDPA attention. An architecture transformers runs on no
SDPA (Gemma 2: its soft-capped scores) gets its eager attention in both.
"""
import time

import torch

from benchmarks.model_folder import hf_config


def causal_lm(shape_name: str, attn_implementation: str):
    """The shape with random bf16 weights on the GPU; a mixture of experts runs its experts through
    transformers' grouped matmuls (torch._grouped_mm), its fastest, not expert by expert."""
    from transformers import AutoModelForCausalLM
    config = hf_config(shape_name)
    moe = {"experts_implementation": "grouped_mm"} if getattr(config, "num_experts_per_tok", 0) else {}
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn_implementation,
                                                **moe).eval()


def supports_sdpa(shape_name: str) -> bool:
    """Whether transformers runs this architecture on SDPA; Gemma 2 is eager only (its soft-capped scores)."""
    from transformers import AutoModelForCausalLM
    config = hf_config(shape_name)
    return AutoModelForCausalLM._model_mapping[type(config)]._supports_sdpa


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def continuous_batching(shape_name: str, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """Output tokens, seconds and requests for one run of generate_batch over all prompts."""
    from transformers.generation import GenerationConfig
    model = causal_lm(shape_name, "paged|sdpa" if supports_sdpa(shape_name) else "paged|eager")
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    results, seconds = timed(lambda: model.generate_batch(inputs=prompts, generation_config=config,
                                                          progress_bar=False))
    out_tokens = sum(len(r.generated_tokens) for r in results.values())
    return {"out_tokens": out_tokens, "seconds": seconds, "requests": len(prompts)}


def single_stream(shape_name: str, prompt: list[int], new_tokens: int) -> dict:
    model = causal_lm(shape_name, "sdpa" if supports_sdpa(shape_name) else "eager")
    ids = torch.tensor([prompt], device="cuda")

    def generate(n):
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    generate(16)  # warm-up
    out, seconds = timed(lambda: generate(new_tokens))
    return {"tok_per_s": round((out.shape[1] - len(prompt)) / seconds, 1), "seconds": round(seconds, 2)}


def padded_encoder(shape_name: str, lengths: list[int], batch_size: int = 128, prebuilt: bool = False) -> dict:
    """BertModel over inputs of these lengths, in batches of 128 sorted by length and padded, as
    sentence-transformers runs it; the [CLS] vector of each, brought to the host.

    As the project's peer script does, each batch's random ids are written row by row on the GPU inside the
    timed loop, with no warm-up. With prebuilt=True the padded batches are built beforehand and the model is
    warmed up: transformers' best case, reported beside the peer's figure."""
    from transformers import BertModel
    with torch.device("cuda"):
        model = BertModel(hf_config(shape_name), add_pooling_layer=False).to(torch.bfloat16).eval()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]

    def build(batch):
        ids = torch.zeros(len(batch), lengths[batch[0]], dtype=torch.long, device="cuda")
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, :lengths[i]] = torch.randint(1000, 30000, (lengths[i],))
            mask[row, :lengths[i]] = 1
        return ids, mask
    built = [build(batch) for batch in batches] if prebuilt else None

    def run():
        with torch.inference_mode():
            for index, batch in enumerate(batches):
                ids, mask = built[index] if prebuilt else build(batch)
                model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0].float().cpu()
    if prebuilt:
        run()
    _, seconds = timed(run)
    return {"inputs_per_s": round(len(lengths) / seconds, 1), "seconds": round(seconds, 2),
            "tok_per_s": round(sum(lengths) / seconds)}
