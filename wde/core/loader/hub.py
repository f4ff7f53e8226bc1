"""Model arguments that name a model on the Hugging Face Hub ("org/name", or "org/name:file.gguf" for one .gguf
file of a repository), resolved to local files through huggingface_hub, as transformers and vLLM resolve them:
the cache first (no network when the files are there), else a download of only what the loader reads, with
huggingface_hub's progress bars. HF_TOKEN, HF_HUB_OFFLINE, HF_HUB_CACHE and HF_ENDPOINT act as they do for
huggingface_hub; `download_dir` replaces the cache folder.
"""
import logging
import os
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id

logger = logging.getLogger(__name__)
# what the loader reads from a model folder: configs, safetensors weights, tokenizer files and chat templates
# (not .bin / .pt weights, nor the .gguf files some repositories hold beside the safetensors)
FOLDER_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def local_model_path(model: str, revision: str | None = None, download_dir: str | None = None) -> str:
    """`model` itself when it is a path on this machine, else the local path of the Hub model it names (a
    folder, or the .gguf file named after the colon). FileNotFoundError when it is neither, saying why."""
    if Path(model).expanduser().exists():
        return model
    repo_id, gguf_file = split_hub_id(model)
    patterns = [gguf_file] if gguf_file else FOLDER_FILES
    arguments = {"repo_id": repo_id, "revision": revision, "cache_dir": download_dir, "allow_patterns": patterns}
    cached = None
    try:
        cached = Path(huggingface_hub.snapshot_download(**arguments, local_files_only=True))
        if holds_the_model(cached, gguf_file):
            return path_in(cached, gguf_file)
    except LocalEntryNotFoundError:
        pass  # not in the cache (or not all of it: per-file downloads leave configs alone): download it
    where = download_dir or huggingface_hub.constants.HF_HUB_CACHE
    if offline():
        raise FileNotFoundError(f"model {model!r}{at_revision(revision)} is not a local path, and is not (all) in "
                                f"the Hugging Face cache at {where} (HF_HUB_OFFLINE is set: nothing is downloaded)"
                                f"{gguf_hint(cached, repo_id, gguf_file)}")
    logger.info("downloading %s%s from the Hugging Face Hub into %s", model, at_revision(revision), where)
    try:
        folder = huggingface_hub.snapshot_download(**arguments)
    except Exception as e:  # noqa: BLE001 - not found, gated, no network, bad revision: the user needs the why
        raise FileNotFoundError(f"model {model!r}{at_revision(revision)} is not a local path, and could not be "
                                f"had from the Hugging Face Hub: {type(e).__name__}: {e}") from e
    if not holds_the_model(Path(folder), gguf_file):
        raise FileNotFoundError(f"the Hub repository {repo_id!r}{at_revision(revision)} has no "
                                f"{gguf_file or 'config.json with safetensors weights, nor a tokenizer'}"
                                f"{gguf_hint(Path(folder), repo_id, gguf_file)}")
    return path_in(Path(folder), gguf_file)


def path_in(folder: Path, gguf_file: str | None) -> str:
    return str(folder / gguf_file) if gguf_file else str(folder)


def split_hub_id(model: str) -> tuple[str, str | None]:
    """"org/name" -> ("org/name", None); "org/name:file.gguf" -> ("org/name", "file.gguf")."""
    repo_id, colon, gguf_file = model.partition(":")
    if colon and not gguf_file.endswith(".gguf"):
        raise FileNotFoundError(f"model {model!r} does not exist: after the colon of a Hub id comes a .gguf file")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(f"model {model!r} does not exist: give a Hugging Face folder (config.json + "
                                "safetensors), a .gguf file, or a Hub id (org/name, org/name:file.gguf)") from None
    return repo_id, gguf_file or None


def holds_the_model(folder: Path, gguf_file: str | None) -> bool:
    """The .gguf file; else a model (config.json and safetensors weights) or a tokenizer alone."""
    if gguf_file:
        return (folder / gguf_file).is_file()
    has_config = (folder / "config.json").is_file()
    if has_config:
        return any(folder.glob("*.safetensors"))
    return (folder / "tokenizer_config.json").is_file()


def gguf_hint(folder: Path | None, repo_id: str, gguf_file: str | None) -> str:
    """For a repository of .gguf files named without one: which to name."""
    files = sorted(path.name for path in folder.glob("*.gguf")) if folder is not None and not gguf_file else []
    return f"; it holds .gguf files: name one, as {repo_id}:{files[0]}" if files else ""


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (its own constant is read once, when it is imported)."""
    return huggingface_hub.constants.HF_HUB_OFFLINE or \
        os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def at_revision(revision: str | None) -> str:
    return f" (revision {revision!r})" if revision else ""
