"""Per-input vectors from the hidden states of a flat batch: the first token, the mean, or the last token; and
the pooling a model folder's sentence-transformers files ask for."""
import json
from pathlib import Path

import torch

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


def sentence_transformers_pooling(folder: str) -> tuple[str, bool] | None:
    """(method, normalize) from modules.json and its Pooling module's config.json; None without modules.json."""
    modules_file = Path(folder) / "modules.json"
    if not modules_file.exists():
        return None
    method, normalize = None, False
    for module in json.loads(modules_file.read_text()):
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
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
    return (method, normalize) if method else None
