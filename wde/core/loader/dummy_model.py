"""A model folder without weights, for load_format="dummy" (random weights): the architecture's config.json and
a word-level tokenizer covering its vocabulary, so an engine starts, tokenizes and detokenizes as for a real
model. Benchmarks build their model shapes with it, and tests their tiny models."""
import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def write_word_level_tokenizer(folder: Path, vocab_size: int, eos_id: int, unk_id: int = 0) -> None:
    """Token i is the word "w{i}"; unk and eos take their ids."""
    vocab = {f"w{i}": i for i in range(vocab_size) if i not in (unk_id, eos_id)}
    vocab["<unk>"], vocab["</s>"] = unk_id, eos_id
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)


def write_dummy_model_folder(folder: Path, config: dict) -> None:
    """config.json from `config` (a transformers config as a dict) and its word-level tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    # encoders have no end-of-sequence token; any id serves, since benchmarks submit token ids
    write_word_level_tokenizer(folder, config["vocab_size"], config.get("eos_token_id", 2))
