"""What a .gguf file holds besides its tensors' bytes (the model config, the tokenizer, where each tensor lies),
read once and kept on disk.

gguf-py parses every metadata entry in Python: opening SmolLM2's file costs ~6 s on a CPU core (49k vocabulary
strings and as many merges), and a load used to open it four times (transformers' config and tokenizer, the
metadata transformers leaves out, the weights): 23 of the 29 s `LLM()` took. The first load of a file writes
the config, a table of its tensors and (when asked for) its tokenizer to a folder of the cache; later loads
read those in 0.3 s and map the tensors straight from the file. A file is known by its real path, size,
modification and change times and inode, with the transformers and gguf versions that read it (entry_key).

The cache is $WDE_CACHE_DIR, else $XDG_CACHE_HOME/wde, else ~/.cache/wde; where it cannot take an entry (not
writable, full), the entry goes to a temporary folder this process removes at exit. A damaged entry (a file
missing or not JSON) is made again.
"""
import atexit
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np
import transformers

logger = logging.getLogger(__name__)
CACHE_FORMAT = 1  # raise when what an entry holds changes: old entries are then left unused


@dataclass
class GGUFTensor:
    """Where one tensor's bytes lie in the file, in the layout gguf-py reads them (quantized: raw bytes)."""

    name: str
    ggml_type: int  # gguf.GGMLQuantizationType
    dtype: str  # numpy's name of the type the bytes are read as
    stored_shape: list[int]  # of the array the bytes are read into (quantized: rows of blocks' bytes)
    shape: list[int]  # the tensor's, rows first (PyTorch's order; the file lists the dimensions the other way)
    offset: int  # from the start of the file


def config_folder(path: str) -> str:
    """A folder with the transformers config of the .gguf file at `path` (config.json) and its tensor table."""
    return str(entry(path, "config", write_config, ["config.json", "tensors.json"]))


def tokenizer_folder(path: str) -> str:
    """A folder with the tokenizer of the .gguf file at `path`, as transformers saves a fast tokenizer."""
    return str(entry(path, "tokenizer", write_tokenizer, ["tokenizer.json", "tokenizer_config.json"]))


def tensors(path: str) -> list[GGUFTensor]:
    table = json.loads((Path(config_folder(path)) / "tensors.json").read_text())
    return [GGUFTensor(**row) for row in table]


def tensor_data(file: np.memmap, tensor: GGUFTensor) -> np.ndarray:
    """The tensor's bytes in `file` (the whole .gguf file mapped as uint8), read-only, as gguf-py gives them."""
    return np.ndarray(tuple(tensor.stored_shape), np.dtype(tensor.dtype), buffer=file, offset=tensor.offset)


def entry(path: str, part: str, write, files: list[str]) -> Path:
    """The cache's folder for `part` of the file at `path` (holding the JSON `files`), which `write(path,
    folder)` fills the first time. An entry already there is used even in a cache this process cannot write
    (one baked into a read-only image); where the cache cannot take a new one (not writable, full), it goes to
    this process's temporary folder."""
    key = entry_key(path)
    folder = cache_root() / key / part
    if is_whole(folder, files):
        return folder
    try:
        return build(path, part, write, folder, files)
    except OSError as e:
        logger.warning("the cache %s cannot keep what %s holds (%s): it goes to a temporary folder, and is read "
                       "again by the next process", cache_root(), path, e)
    folder = fallback_root() / key / part
    return folder if is_whole(folder, files) else build(path, part, write, folder, files)


def is_whole(folder: Path, files: list[str]) -> bool:
    try:
        for name in files:
            json.loads((folder / name).read_text())
        return True
    except (OSError, ValueError):
        return False


def build(path: str, part: str, write, folder: Path, files: list[str]) -> Path:
    if folder.is_dir():
        logger.warning("the cache entry %s is damaged (a file missing or not JSON): %s is read again", folder, path)
        shutil.rmtree(folder)
    start = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=folder.parent))  # renamed whole when complete
    try:
        write(path, building)
        for item in [building, *building.rglob("*")]:  # mkdtemp's 0700: other users of a shared cache read it
            item.chmod(0o755 if item.is_dir() else 0o644)
        os.rename(building, folder)
    except OSError:
        if not is_whole(folder, files):  # not because another process put its copy there first
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)  # gone already when renamed
        with contextlib.suppress(OSError):  # a file that could not be read leaves no empty entry behind
            folder.parent.rmdir()
    logger.info("read the %s of %s in %.1f s; kept in %s", part, path, time.perf_counter() - start, folder)
    return folder


def entry_key(path: str) -> str:
    """The file's identity: its real path, size, modification and change times and inode (a file copied over
    another with its mtime kept, as rsync -a and cp -p do, still has a new ctime), and the readers' versions."""
    real = os.path.realpath(path)
    status = os.stat(real)
    identity = f"{real}|{status.st_size}|{status.st_mtime_ns}|{status.st_ctime_ns}|{status.st_ino}|" \
               f"{CACHE_FORMAT}|{transformers.__version__}|{importlib.metadata.version('gguf')}"
    return f"{Path(real).stem[:40]}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def cache_root() -> Path:
    base = os.environ.get("WDE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wde"
    return Path(base) / "gguf"


_fallback_root: Path | None = None


def fallback_root() -> Path:
    """This process's own temporary folder, removed at exit."""
    global _fallback_root
    if _fallback_root is None:
        _fallback_root = Path(tempfile.mkdtemp(prefix="wde-gguf-"))
        atexit.register(shutil.rmtree, _fallback_root, True)
    return _fallback_root


def write_config(path: str, folder: Path) -> None:
    """transformers' config of the file, with two things it does not take from a .gguf file: attention.key_length
    (Qwen3's head_dim is not hidden_size / heads) and the rope_freqs tensor, in which llama.cpp stores Llama 3.x
    RoPE scaling as one divisor per frequency (kept on the config as `rope_freq_divisors` for RotaryEmbedding);
    and the table of its tensors."""
    config = from_gguf(transformers.AutoConfig, path)
    reader = gguf.GGUFReader(path)
    architecture = reader.fields["general.architecture"].contents()
    key_length = reader.fields.get(f"{architecture}.attention.key_length")
    if key_length is not None:
        config.head_dim = int(key_length.contents())
    fields = {key: field.contents() for key, field in reader.fields.items() if key.startswith(f"{architecture}.expert")}
    shared = next((int(t.data.shape[0]) for t in reader.tensors if t.name.endswith(".ffn_gate_shexp.weight")), 0)
    config = with_experts(config, fields, architecture, shared)
    window = reader.fields.get(f"{architecture}.attention.sliding_window")
    if window is not None:
        config.sliding_window = int(window.contents())
    with_longrope(config, reader, architecture)
    if architecture in ("gemma2", "gemma3"):
        with_gemma(config, reader, architecture)
    table = []
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            config.rope_freq_divisors = [float(x) for x in tensor.data]
        table.append(asdict(GGUFTensor(tensor.name, int(tensor.tensor_type), tensor.data.dtype.str,
                                       list(tensor.data.shape), list(reversed(tensor.shape.tolist())),
                                       int(tensor.data_offset))))
    (folder / "tensors.json").write_text(json.dumps(table))
    config.save_pretrained(folder)


def with_experts(config: transformers.PretrainedConfig, fields: dict, architecture: str, shared_rows: int
                 ) -> transformers.PretrainedConfig:
    """What transformers leaves out of a mixture of experts' config: the experts' own sizes (the shared
    expert's, `shared_rows`, from its tensor when no key gives it), whether the top-k weights are renormalized
    (llama.cpp's default for the architecture unless the file says), and for a Mixtral file (llama.cpp's
    "llama" architecture with experts) the Mixtral config itself."""
    field = lambda name, default=None: fields.get(f"{architecture}.{name}", default)  # noqa: E731
    if field("expert_count", 0) == 0:
        return config
    if not field("expert_used_count"):
        raise ValueError(f"a mixture of {field('expert_count')} experts whose {architecture}.expert_used_count "
                         f"(the experts a token takes) is {field('expert_used_count', 'missing')}")
    if architecture == "llama":
        config = transformers.MixtralConfig(**{**config.to_dict(), "model_type": "mixtral"},
                                            num_local_experts=int(field("expert_count")),
                                            num_experts_per_tok=int(field("expert_used_count")))
    elif architecture in ("qwen2moe", "qwen3moe"):
        config.moe_intermediate_size = int(field("expert_feed_forward_length", config.moe_intermediate_size))
        config.norm_topk_prob = bool(field("expert_weights_norm", architecture == "qwen3moe"))
        if architecture == "qwen2moe":
            config.shared_expert_intermediate_size = int(field("expert_shared_feed_forward_length", shared_rows))
    return config


def with_longrope(config: transformers.PretrainedConfig, reader: "gguf.GGUFReader", architecture: str) -> None:
    """Phi-3's LongRoPE, which llama.cpp keeps as two tensors of factors (short and long) and the original
    context length: into the config's rope_parameters, as transformers reads them."""
    factors = {t.name: [float(x) for x in t.data] for t in reader.tensors
               if t.name in ("rope_factors_long.weight", "rope_factors_short.weight")}
    if not factors:
        return
    original = reader.fields.get(f"{architecture}.rope.scaling.original_context_length")
    if original is None or len(factors) != 2:
        raise ValueError("LongRoPE factors without both tensors and rope.scaling.original_context_length")
    config.original_max_position_embeddings = int(original.contents())
    config.rope_parameters = {**(config.rope_parameters or {}), "rope_type": "longrope",
                              "long_factor": factors["rope_factors_long.weight"],
                              "short_factor": factors["rope_factors_short.weight"],
                              "original_max_position_embeddings": config.original_max_position_embeddings}
    attention_factor = reader.fields.get(f"{architecture}.rope.scaling.attn_factor")
    if attention_factor is not None:
        config.rope_parameters["attention_factor"] = float(attention_factor.contents())


# llama.cpp's Gemma 27B models scale queries by hidden / heads, the others by head_dim: it tells them by depth
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def with_gemma(config: transformers.PretrainedConfig, reader: "gguf.GGUFReader", architecture: str) -> None:
    """What transformers leaves at its defaults on a Gemma file: the soft caps the file holds (Gemma 2), the query
    scale llama.cpp derives, and Gemma 3's RoPE of its global layers (the file's base and linear factor; the
    local layers keep base 10,000, as llama.cpp does)."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        field = reader.fields.get(f"{architecture}.{key}")
        if field is not None:
            setattr(config, key, float(field.contents()))
    deep = config.num_hidden_layers == GEMMA_27B_LAYERS[architecture]
    config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads if deep else config.head_dim
    if architecture == "gemma3":
        base = reader.fields.get(f"{architecture}.rope.freq_base")
        factor = reader.fields.get(f"{architecture}.rope.scaling.factor")
        config.rope_parameters = {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear" if factor is not None else "default",
                               "rope_theta": float(base.contents()) if base is not None else 1000000.0,
                               **({"factor": float(factor.contents())} if factor is not None else {})}}


def write_tokenizer(path: str, folder: Path) -> None:
    from_gguf(transformers.AutoTokenizer, path).save_pretrained(folder)


def from_gguf(auto_class, path: str):
    """transformers' reading of the .gguf file at `path` ("model.gguf" alone: in the current folder)."""
    folder, name = os.path.split(os.path.abspath(path))
    return auto_class.from_pretrained(folder, gguf_file=name)
