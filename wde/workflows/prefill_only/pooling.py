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


def load_dense(folder: Path) -> Dense:
    config = json.loads((folder / "config.json").read_text())
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in DENSE_ACTIVATIONS:
        raise ValueError(f"{folder}: dense activation {activation!r} is not supported "
                         f"({', '.join(DENSE_ACTIVATIONS)})")
    weights_file = folder / "model.safetensors"
    if not weights_file.exists():
        raise FileNotFoundError(f"{folder}: a Dense module's weights are read from model.safetensors")
    weights = load_file(weights_file)
    return Dense(weights["linear.weight"].float(), weights["linear.bias"].float() if config.get("bias", True)
                 else None, activation)


def sentence_transformers_pooling(folder: str) -> SentenceTransformersPooling | None:
    """The pooling of modules.json, its Pooling module's config.json and the Dense modules after it; None
    without modules.json."""
    modules_file = Path(folder) / "modules.json"
    if not modules_file.exists():
        return None
    method, normalize, dense = None, False, []
    for module in json.loads(modules_file.read_text()):
        kind = module.get("type", "")
        if kind.endswith("Dense"):
            dense.append(load_dense(Path(folder) / module["path"]))
        elif kind.endswith("Pooling"):
            config = json.loads((Path(folder) / module["path"] / "config.json").read_text())
            chosen = [name for name, key in (("cls", "pooling_mode_cls_token"), ("mean", "pooling_mode_mean_tokens"),
                                             ("last", "pooling_mode_lasttoken")) if config.get(key)]
            unsupported = [key for key in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                                           "pooling_mode_weightedmean_tokens") if config.get(key)]
            if unsupported or len(chosen) != 1:
                raise ValueError(f"{modules_file.parent}: pooling {unsupported or chosen} is not supported "
                                 f"(one of {', '.join(METHODS)})")
            method = chosen[0]
        elif kind.endswith("Normalize"):
            normalize = True
    return SentenceTransformersPooling(method, normalize, dense) if method else None
