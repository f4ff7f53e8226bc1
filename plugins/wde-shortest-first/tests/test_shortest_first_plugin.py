"""The scheduler plugin, installed with pip: selected by name, it changes the order of admission and not the
tokens of any request."""
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from wde import LLM, SamplingParams
from wde.core.plugins import load_plugins


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> str:
    """A small random Llama with a word-level tokenizer."""
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 initializer_range=0.2, eos_token_id=1, bos_token_id=None)).save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(2, 512)} | {"<unk>": 0, "</s>": 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    return str(folder)


def admission_order(llm: LLM, prompts: list[list[int]]) -> tuple[list[str], list[list[int]]]:
    """Request ids in the order the scheduler first ran them, and every request's tokens."""
    order, schedule = [], llm.engine.scheduler.schedule

    def recording():
        output = schedule()
        for item in output.scheduled:
            request_id = item.seq.group.request_id
            if request_id not in order:
                order.append(request_id)
        return output
    llm.engine.scheduler.schedule = recording
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    first_id = int(outputs[0].request_id)
    return [str(int(request_id) - first_id) for request_id in order], [o.outputs[0].token_ids for o in outputs]


def test_the_plugin_is_found_and_changes_only_the_order(llama_folder):
    assert any(s.name == "shortest-first" and s.status == "loaded" for s in load_plugins())
    rng = random.Random(1)
    lengths = [50, 5, 30, 12, 2]
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in lengths]
    fifo = LLM(model=llama_folder, max_num_seqs=1, num_kv_blocks=32)
    shortest = LLM(model=llama_folder, max_num_seqs=1, num_kv_blocks=32, workflow="chat-shortest-first")
    assert type(shortest.engine.scheduler).__name__ == "ShortestFirstScheduler"
    fifo_order, fifo_tokens = admission_order(fifo, prompts)
    shortest_order, shortest_tokens = admission_order(shortest, prompts)
    assert fifo_order == ["0", "1", "2", "3", "4"]
    assert shortest_order == ["4", "1", "3", "2", "0"]
    assert shortest_tokens == fifo_tokens
