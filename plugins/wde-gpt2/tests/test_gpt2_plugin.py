"""The GPT-2 plugin, installed with pip and found through its entry point: greedy tokens and their logprobs
against transformers on random weights."""
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from wde import LLM, SamplingParams
from wde.core.plugins import load_plugins


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(vocab_size=512, n_positions=256, n_embd=64, n_layer=3, n_head=4, initializer_range=0.2,
                        bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(2, 512)} | {"<unk>": 0, "</s>": 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    return str(folder)


def test_wde_finds_the_plugin_through_its_entry_point():
    status = next(s for s in load_plugins() if s.name == "gpt2")
    assert status.status == "loaded" and status.distribution == "wde-gpt2" and status.value == "wde_gpt2:register"


def test_gpt2_generation_matches_transformers(gpt2_folder):
    llm = LLM(model=gpt2_folder, num_kv_blocks=64, max_num_seqs=3, max_num_batched_tokens=48)
    assert llm.engine.workflow.__name__ == "ChatWorkflow"  # the workflow its registration names
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in (4, 30, 70, 11)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0))
    reference = GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + completion.token_ids])).logits[0]
        expected = logits.log_softmax(-1)[len(prompt) - 1:-1]
        assert completion.token_ids == expected.argmax(-1).tolist()
        ours = torch.tensor([step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)])
        assert (ours - expected.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]).abs().max() < 1e-3


def test_gpt2_split_over_two_ranks_gives_the_same_tokens(gpt2_folder):
    """The worker process finds GPT2LMHeadModel only through the plugin's registration, made there too."""
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in (6, 25)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    split = LLM(model=gpt2_folder, num_kv_blocks=32, tensor_parallel_size=2)
    try:
        two = [o.outputs[0].token_ids for o in split.generate(prompts, params, use_tqdm=False)]
    finally:
        split.close()
    one = [o.outputs[0].token_ids for o in LLM(model=gpt2_folder, num_kv_blocks=32).generate(prompts, params,
                                                                                             use_tqdm=False)]
    assert two == one
