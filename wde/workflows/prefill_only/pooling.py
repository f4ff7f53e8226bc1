"""Per-input vectors from the hidden states of a flat batch: the first token, the mean, or the last token; and
the pooling a model folder's sentence-transformers files ask for (with the dense layers after it, if any)."""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from wde.workflows.prefill_only.model_pre_processor import PoolingMetadata

METHODS = ("cls", "mean", "last")


def pool(hidden: torch.Tensor, meta: PoolingMetadata, method: str) -> torch.Tensor:
    """[tokens, hidden] -> [inputs, hidden] in float32."""
    if method == "cls":
        return hidden[meta.first_rows].float()
    if method == "last":
        return hidden[meta.first_rows + meta.num_rows - 1].float()
    owner = torch.repeat_interleave(torch.arange(len(meta.params), device=hidden.device), meta.num_rows)
    sums = torch.zeros(len(meta.params), hidden.shape[1], device=hidden.device).index_add_(0, owner, hidden.float())
    return sums / meta.num_rows[:, None]


# the activations of sentence-transformers' Dense modules, by the name its config.json gives
DENSE_ACTIVATIONS = {"torch.nn.modules.linear.Identity": lambda x: x, "torch.nn.modules.activation.Tanh": torch.tanh}


@dataclass
class Dense:
    """A sentence-transformers Dense module: activation(x W^T + b), in float32."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    activation: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return DENSE_ACTIVATIONS[self.activation](torch.nn.functional.linear(x, self.weight, self.bias))


@dataclass
class SentenceTransformersPooling:
    method: str
    normalize: bool
    dense: list[Dense] = field(default_factory=list)  # applied in order after pooling

    def width(self, hidden_size: int) -> int:
        """The embedding's width: the last Dense module's output, else the hidden states'."""
        return self.dense[-1].weight.shape[0] if self.dense else hidden_size


def read_json(path: Path, kind: type):
    """A JSON file that must hold a `kind` (dict or list), or an error that names it."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(value, kind):
        raise ValueError(f"{path}: holds a {type(value).__name__}, not a JSON {kind.__name__}")
    return value


def load_dense(folder: Path, in_features: int) -> Dense:
    """The Dense module in `folder`, checked to take `in_features` (the width before it)."""
    config = read_json(folder / "config.json", dict)
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in DENSE_ACTIVATIONS:
        raise ValueError(f"{folder}: dense activation {activation!r} is not supported "
                         f"({', '.join(DENSE_ACTIVATIONS)})")
    weights_file = folder / "model.safetensors"
    if not weights_file.exists():
        raise FileNotFoundError(f"{folder}: a Dense module's weights are read from model.safetensors")
    try:
        weights = load_file(weights_file)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"could not read {weights_file}: {e}") from e
    wanted = ["linear.weight"] + (["linear.bias"] if config.get("bias", True) else [])
    missing = [name for name in wanted if name not in weights]
    if missing:
        raise ValueError(f"{weights_file} has no {', '.join(missing)} (it holds {', '.join(sorted(weights))})")
    weight = weights["linear.weight"].float()
    bias = weights["linear.bias"].float() if "linear.bias" in wanted else None
    if weight.dim() != 2 or weight.shape[1] != in_features or (bias is not None and bias.shape != weight.shape[:1]):
        raise ValueError(f"{folder}: a Dense of weight {list(weight.shape)}"
                         f"{'' if bias is None else f' and bias {list(bias.shape)}'} cannot take the "
                         f"{in_features} values before it")
    return Dense(weight, bias, activation)


def pooling_method(config_file: Path) -> str:
    config = read_json(config_file, dict)
    chosen = [name for name, key in (("cls", "pooling_mode_cls_token"), ("mean", "pooling_mode_mean_tokens"),
                                     ("last", "pooling_mode_lasttoken")) if config.get(key)]
    unsupported = [key for key in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                                   "pooling_mode_weightedmean_tokens") if config.get(key)]
    if unsupported or len(chosen) != 1:
        raise ValueError(f"{config_file.parent.parent}: pooling {unsupported or chosen} is not supported "
                         f"(one of {', '.join(METHODS)})")
    return chosen[0]


def sentence_transformers_pooling(folder: str, hidden_size: int) -> SentenceTransformersPooling | None:
    """The pooling of modules.json, its Pooling module's config.json and the Dense modules after it (checked to
    chain from hidden_size); None without modules.json."""
    modules_file = Path(folder) / "modules.json"
    if not modules_file.exists():
        return None
    method, normalize, dense = None, False, []
    for module in read_json(modules_file, list):
        kind = module.get("type", "") if isinstance(module, dict) else None
        if kind is None or (kind.endswith(("Dense", "Pooling")) and not isinstance(module.get("path"), str)):
            raise ValueError(f"{modules_file}: a module entry must be an object with a type and a path: {module!r}")
        if kind.endswith("Dense"):
            if method is None:
                raise ValueError(f"{modules_file}: a Dense module before any Pooling module")
            dense.append(load_dense(Path(folder) / module["path"], dense[-1].weight.shape[0] if dense else hidden_size))
        elif kind.endswith("Pooling"):
            method = pooling_method(Path(folder) / module["path"] / "config.json")
        elif kind.endswith("Normalize"):
            normalize = True
    return SentenceTransformersPooling(method, normalize, dense) if method else None
