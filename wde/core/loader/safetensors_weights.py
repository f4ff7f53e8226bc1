"""Checkpoint tensors from a Hugging Face folder: one .safetensors file, or several listed by an index."""
import json
from pathlib import Path
from typing import Iterator

from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(folder: str) -> list[Path]:
    index = Path(folder) / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"could not read the shard index {index}: {e}") from e
        return [Path(folder) / name for name in sorted(set(weight_map.values()))]
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    return files


def iterate_safetensors(folder: str) -> Iterator[tuple[str, object]]:
    """(name, slice) pairs: a safetensors slice reads only the rows or columns asked of it, so under tensor
    parallelism each rank reads its own share of each weight, never the whole model."""
    for file in safetensors_files(folder):
        if not file.exists():
            raise FileNotFoundError(f"the shard index lists {file.name}, which is not in {folder}")
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_slice(name)
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise ValueError(f"could not read weights from {file}: {e}") from e
