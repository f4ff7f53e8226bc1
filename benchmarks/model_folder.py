"""Model folders for benchmarks: the shapes in model_shapes/, written as folders for random weights
(load_format="dummy"; wde/core/loader/dummy_model.py), with a word-level tokenizer ("w0", "w1", ...) or, where
what the tokens spell matters (structured outputs: a grammar needs tokens that write JSON), a byte-level BPE
tokenizer trained on this machine's Python sources, a vocabulary of code, numbers and punctuation about as
large as the shape's."""
import json
import logging
import sysconfig
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, PreTrainedTokenizerFast

from wde.core.loader.dummy_model import write_dummy_model_folder

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


logger = logging.getLogger("benchmarks")
BPE_SOURCE_BYTES = 300_000_000  # enough Python for about 150k merges (Qwen's vocabulary size)
END_OF_TEXT = "<|endoftext|>"


def model_folder(name: str, tokenizer: str = "word-level") -> str:
    """A folder for shape `name` with a "word-level" or "bpe" tokenizer (made once per machine, under the
    temp directory)."""
    if tokenizer not in ("word-level", "bpe"):
        raise ValueError(f"unknown benchmark tokenizer {tokenizer!r} (word-level or bpe)")
    folder = Path(tempfile.gettempdir()) / "wde-benchmark-models" / (name if tokenizer == "word-level"
                                                                      else f"{name}-bpe")
    if not (folder / "tokenizer.json").exists():
        config = shape(name)
        write_dummy_model_folder(folder, config)
        if tokenizer == "bpe":
            write_trained_bpe_tokenizer(folder, config["vocab_size"])
    return str(folder)


def python_sources(limit_bytes: int) -> list[str]:
    """The texts of the interpreter's .py files (standard library, then installed packages), tests left out."""
    roots = dict.fromkeys(Path(sysconfig.get_paths()[key]) for key in ("stdlib", "purelib", "platlib"))
    texts, size = [], 0
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if size >= limit_bytes:
                return texts
            if "test" in path.parts or "tests" in path.parts:
                continue
            texts.append(path.read_text(errors="ignore"))
            size += len(texts[-1])
    return texts


def write_trained_bpe_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE of up to vocab_size tokens (every string writable) trained on python_sources; its
    end-of-text token takes id 0. Ids past its vocabulary stand for no text (as Qwen's padded vocabulary)."""
    start = time.perf_counter()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(python_sources(BPE_SOURCE_BYTES), trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END_OF_TEXT).save_pretrained(folder)
    logger.info("benchmark tokenizer: byte-level BPE of %d tokens trained on Python sources in %.0f s",
                backend.get_vocab_size(), time.perf_counter() - start)
