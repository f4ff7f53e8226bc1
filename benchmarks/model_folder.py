"""Model folders for benchmarks: the shapes in model_shapes/, written as folders for random weights
(load_format="dummy"; wde/core/loader/dummy_model.py)."""
import json
import tempfile
from pathlib import Path

from transformers import AutoConfig

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


def model_folder(name: str) -> str:
    """A folder for shape `name` (made once per machine, under the temp directory)."""
    folder = Path(tempfile.gettempdir()) / "wde-benchmark-models" / name
    if not (folder / "tokenizer.json").exists():
        write_dummy_model_folder(folder, shape(name))
    return str(folder)
