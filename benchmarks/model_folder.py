"""Model folders for benchmarks: an architecture's config.json (the shapes in model_shapes/) and a word-level
tokenizer covering its vocabulary, so wde starts, tokenizes and detokenizes exactly as for a real model while
the weights are random (load_format="dummy")."""
import json
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast

SHAPES_DIR = Path(__file__).parent / "model_shapes"


def shape(name: str) -> dict:
    path = SHAPES_DIR / f"{name}.json"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in SHAPES_DIR.glob("*.json")))
        raise ValueError(f"no model shape {name!r}; known: {known}")
    return json.loads(path.read_text())


def hf_config(name: str):
    """The shape as a transformers config object (for the peer, which builds its model from it)."""
    config = dict(shape(name))
    return AutoConfig.for_model(config.pop("model_type"), **config)


def write_word_level_tokenizer(folder: Path, vocab_size: int, eos_id: int, unk_id: int = 0) -> None:
    """Token i is the word "w{i}"; unk and eos take their ids."""
    vocab = {f"w{i}": i for i in range(vocab_size) if i not in (unk_id, eos_id)}
    vocab["<unk>"], vocab["</s>"] = unk_id, eos_id
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)


def model_folder(name: str) -> str:
    """A folder for shape `name` (made once per machine, under the temp directory)."""
    folder = Path(tempfile.gettempdir()) / "wde-benchmark-models" / name
    if not (folder / "tokenizer.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        config = shape(name)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        # encoders have no end-of-sequence token; any id serves, since benchmarks submit token ids
        write_word_level_tokenizer(folder, config["vocab_size"], config.get("eos_token_id", 2))
    return str(folder)
