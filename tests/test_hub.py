"""Models given as Hugging Face Hub ids resolve from a cache laid out as huggingface_hub lays it out, offline:
a folder, one .gguf file of a repository, a revision, and a clear error for what the cache lacks."""
import shutil
from pathlib import Path

import pytest

from tests.gguf_export import export_gguf
from tests.test_loading import generate
from wde.core.loader import hub as hub_module
from wde.entrypoints.cli import main, served_name

COMMIT, OTHER_COMMIT = "a" * 40, "b" * 40


def add_snapshot(cache: Path, repo_id: str, commit: str, files: list[Path], ref: str | None = "main") -> None:
    """A snapshot as huggingface_hub keeps it: models--org--name/snapshots/<commit>/..., refs/<ref> -> commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in files:
        shutil.copy(file, snapshot / file.name)
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def hub(tiny_model_dir, tmp_path, monkeypatch):
    """(cache folder, local folder of the model it holds as wde-test/tiny, of its revision v2, of its .gguf)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
    cache = tmp_path / "hub"
    main_model, v2_model = Path(tiny_model_dir("qwen3")), Path(tiny_model_dir("qwen3", seed=1))
    add_snapshot(cache, "wde-test/tiny", COMMIT, sorted(main_model.iterdir()))
    add_snapshot(cache, "wde-test/tiny", OTHER_COMMIT, sorted(v2_model.iterdir()), ref="v2")
    gguf_file = export_gguf(main_model, tmp_path / "tiny-q.gguf")
    other = Path(shutil.copy(gguf_file, tmp_path / "other.gguf"))  # a repository often holds several
    add_snapshot(cache, "wde-test/tiny-gguf", COMMIT, [gguf_file, other])
    return cache, str(main_model), str(v2_model), str(gguf_file)


def tokens(model: str, **engine_args) -> list[list[int]]:
    return [c.token_ids for c in generate(model, **engine_args)]


def test_a_hub_id_loads_the_folder_its_cache_holds(hub):
    cache, folder, _, _ = hub
    assert tokens("wde-test/tiny", download_dir=str(cache)) == tokens(folder)


def test_a_revision_picks_its_snapshot(hub):
    cache, _, v2_folder, _ = hub
    assert tokens("wde-test/tiny", revision="v2", download_dir=str(cache)) == tokens(v2_folder)
    assert tokens("wde-test/tiny", revision=OTHER_COMMIT, download_dir=str(cache)) == tokens(v2_folder)


def test_one_gguf_file_of_a_repository_and_a_hub_tokenizer(hub):
    cache, folder, _, gguf_file = hub
    assert tokens("wde-test/tiny-gguf:tiny-q.gguf", tokenizer="wde-test/tiny", download_dir=str(cache)) == \
           tokens(gguf_file, tokenizer=folder)


@pytest.mark.parametrize("model,message", [
    ("wde-test/absent", "'wde-test/absent' is not a local path, and is not \\(all\\) in the Hugging Face cache at"),
    ("wde-test/tiny-gguf:missing.gguf", "is not \\(all\\) in the Hugging Face cache"),
    ("wde-test/tiny:weights.bin", "after the colon of a Hub id comes a .gguf file"),
    ("not a path//nor an id", "does not exist: give a Hugging Face folder"),
])
def test_what_the_cache_lacks_offline_is_named(hub, model, message):
    cache, *_ = hub
    with pytest.raises(FileNotFoundError, match=message) as raised:
        generate(model, download_dir=str(cache))
    if "cache at" in message:
        assert str(cache) in str(raised.value) and "HF_HUB_OFFLINE" in str(raised.value)


def test_the_cli_takes_a_hub_id_and_serves_it_under_its_name(hub, capsys):
    cache, *_ = hub
    assert main(["--log-level", "WARNING", "generate", "hello", "--model", "wde-test/tiny", "--download-dir",
                 str(cache), "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("hello")
    assert served_name("wde-test/tiny") == "wde-test/tiny"


def test_the_cache_is_read_first_and_a_download_asks_only_for_what_the_loader_reads(hub, monkeypatch):
    cache, folder, _, gguf_file = hub
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_module, "offline", lambda: False)
    real_download, asked = hub_module.huggingface_hub.snapshot_download, []

    def download(**arguments):
        local = arguments.pop("local_files_only", False)
        asked.append((arguments["repo_id"], arguments["allow_patterns"], local))
        if not local:  # a "download": the files appear in a new snapshot of the cache
            add_snapshot(cache, arguments["repo_id"], "c" * 40, sorted(Path(folder).iterdir()))
        return real_download(**arguments, local_files_only=True)
    monkeypatch.setattr(hub_module.huggingface_hub, "snapshot_download", download)
    assert tokens("wde-test/tiny", download_dir=str(cache)) == tokens(folder)
    assert asked == [("wde-test/tiny", hub_module.FOLDER_FILES, True)]  # found in the cache: no network
    asked.clear()
    assert hub_module.local_model_path("wde-test/tiny-gguf:tiny-q.gguf", download_dir=str(cache)).endswith(
        "tiny-q.gguf")
    assert asked == [("wde-test/tiny-gguf", ["tiny-q.gguf"], True)]  # the one file, not the repository
    asked.clear()
    assert tokens("wde-test/new", download_dir=str(cache)) == tokens(folder)
    assert [a[2] for a in asked] == [True, False]  # the cache, then a download of the loader's files
    assert asked[1][1] == hub_module.FOLDER_FILES and "*.bin" not in asked[1][1]


def test_a_snapshot_with_configs_alone_is_not_taken_for_the_model(hub, tmp_path):
    """What per-file downloads leave (config and tokenizer, no weights) is not all the loader reads."""
    cache, folder, _, _ = hub
    partial = [p for p in sorted(Path(folder).iterdir()) if not p.name.endswith(".safetensors")]
    add_snapshot(cache, "wde-test/partial", COMMIT, partial)
    with pytest.raises(FileNotFoundError, match="is not \\(all\\) in the Hugging Face cache"):
        generate("wde-test/partial", download_dir=str(cache))


def test_a_repository_of_gguf_files_named_without_one_says_which_to_name(hub):
    cache, *_ = hub
    with pytest.raises(FileNotFoundError, match="name one, as wde-test/tiny-gguf:other.gguf"):
        generate("wde-test/tiny-gguf", download_dir=str(cache))
    with pytest.raises(FileNotFoundError, match="after the colon of a Hub id comes a .gguf file"):
        generate("wde-test/tiny:", download_dir=str(cache))
