"""The padding of captured steps (wde/core/cuda_graphs.py), checked on the CPU: a stand-in capture runs the
forward pass again on the static buffers at every replay, through the Triton kernels (interpreted), so each step
sees exactly what a CUDA graph's replay would (padding rows, empty sequence slots, wider block tables, launches
sized for any step) and must give the tokens and log-probabilities of the unpadded eager step."""
from collections import Counter

import torch

from tests.conftest import run_to_completion
from tests.test_parity_random import random_prompts
from wde import LLMEngine, SamplingParams
from wde.core.attention.metadata import build_attn_metadata
from wde.core.forward_context import get_attn_metadata
from wde.core.cuda_graphs import StepCudaGraphs, token_count_ladder


class ReplayEagerly:
    """Stands in for CudaGraphCapture: a replay is the forward pass run again, counted by kind."""

    def __init__(self):
        self.replays = Counter()

    def __call__(self, forward, size):
        def replay():
            self.replays[forward.__name__] += 1
            return forward(size)
        return replay


def generate(folder: str, graphed: bool) -> tuple[list, Counter]:
    engine = LLMEngine.from_engine_args(model=folder, num_kv_blocks=64, attention_backend="triton", max_num_seqs=4,
                                        max_num_batched_tokens=64, enable_prefix_caching=True)
    capture = ReplayEagerly()
    if graphed:
        worker, args = engine.executor.worker, engine.config.args
        worker.cuda_graphs = StepCudaGraphs(worker.model, args.max_num_seqs, args.max_num_batched_tokens,
                                            engine.config.model.max_model_len, args.block_size, worker.device,
                                            worker._greedy_tokens, with_prefill=True, capture=capture,
                                            num_kv_groups=worker.kv_layer_groups.num_groups)
        capture.replays.clear()  # what capturing ran
    # more prompts than slots, ending at different steps: prompts are read beside decoding rows, in chunks (90
    # tokens > 64), one after a cached prefix
    prompts = random_prompts([21, 3, 90, 40, 7, 33], seed=11) + [random_prompts([21], seed=11)[0] + [9, 4]]
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=3 + 2 * i, ignore_eos=True,
                                                          logprobs=0))
    outputs = run_to_completion(engine)
    return [outputs[str(i)].outputs[0] for i in range(len(prompts))], capture.replays


def test_padded_steps_give_the_tokens_of_eager_steps(tiny_model_dir):
    folder = tiny_model_dir("qwen3")  # per-head norms: the fused rotation's every input
    graphed, replays = generate(folder, graphed=True)
    eager, _ = generate(folder, graphed=False)
    assert replays["_prefill_forward"] >= 5 and replays["_decode_forward"] >= 5  # both kinds ran, every step
    assert [c.token_ids for c in graphed] == [c.token_ids for c in eager]
    for a, b in zip(graphed, eager):
        for step_a, step_b, token in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(step_a[token].logprob - step_b[token].logprob) < 1e-4


def test_token_count_ladder_pads_a_step_by_at_most_a_quarter():
    for max_tokens in (32, 100, 2048, 8192, 10000):
        ladder = token_count_ladder(max_tokens)
        assert ladder[-1] == max_tokens and ladder == sorted(set(ladder))
        assert all(b <= max(a + 32, a * 1.25) for a, b in zip(ladder, ladder[1:]))
    assert len(token_count_ladder(8192)) <= 32


class EchoModel(torch.nn.Module):
    """Hidden states = the input ids; it keeps the attention metadata of its last call."""

    def forward(self, input_ids, positions):
        self.metadata = get_attn_metadata()
        return input_ids[:, None].float()

    def compute_logits(self, hidden, gather=True):
        return hidden


def test_a_smaller_step_after_a_larger_one_leaves_no_stale_slot():
    model = EchoModel()
    graphs = StepCudaGraphs(model, max_batch=4, max_tokens=64, max_model_len=64, block_size=16,
                            device=torch.device("cpu"), greedy_tokens=None, with_prefill=True,
                            capture=ReplayEagerly())
    big = build_attn_metadata(list(range(9)), [1, 1, 5, 2], [10, 20, 5, 2], [[1], [2, 3], [4], [5]])
    graphs.run_with_prefill(torch.arange(9), torch.arange(9), big)
    small = build_attn_metadata([40, 41, 42], [3], [3], [[2]])
    hidden = graphs.run_with_prefill(torch.tensor([7, 8, 9]), torch.arange(3), small)
    assert hidden[:, 0].tolist() == [7, 8, 9]
    meta = model.metadata  # what the kernels read: 32 token rows (the smallest size), every slot
    assert meta.query_start_loc.tolist() == [0, 3, 3, 3, 3]  # the unused slots are empty, after the last token
    assert meta.seq_lens.tolist() == [3, 0, 0, 0]
    assert meta.block_tables[0, 0] == 2
    assert meta.slot_mapping.tolist() == [40, 41, 42] + [-1] * 29  # padding writes no KV
    assert (meta.min_query_len, meta.max_query_len) == (1, 2)  # both kernels launch, whatever the step
