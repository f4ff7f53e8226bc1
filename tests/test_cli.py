"""The `wde` command and its engine-argument flags and config files."""
import json

import pytest

from wde.entrypoints.cli import build_parser, engine_args_from, main


def parse(*argv):
    return build_parser().parse_args(["generate", "hello", *argv])


def test_every_engine_argument_has_a_flag():
    args = engine_args_from(parse("--max-num-seqs", "7", "--dtype", "float32", "--enable-prefix-caching",
                                  "--gpu-memory-utilization", "0.5"))
    assert (args.max_num_seqs, args.dtype, args.enable_prefix_caching, args.gpu_memory_utilization) == \
        (7, "float32", True, 0.5)
    serve = build_parser().parse_args(["serve", "--reasoning-parser", "qwen3"])  # a Literal | None: its choices
    assert engine_args_from(serve).reasoning_parser == serve.reasoning_parser == "qwen3"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--reasoning-parser", "nope"])


@pytest.mark.parametrize("suffix,text", [
    (".json", json.dumps({"max_num_seqs": 5, "block_size": 32})),
    (".yaml", "max_num_seqs: 5\nblock_size: 32\n"),
])
def test_config_file_sets_engine_arguments_and_flags_override_it(tmp_path, suffix, text):
    path = tmp_path / f"engine{suffix}"
    path.write_text(text)
    args = engine_args_from(parse("--config", str(path), "--block-size", "64"))
    assert (args.max_num_seqs, args.block_size) == (5, 64)


def test_config_file_with_an_unknown_argument_is_refused(tmp_path, capsys):
    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"max_num_sequences": 5}))
    assert main(["generate", "hi", "--config", str(path)]) == 2
    assert "max_num_sequences" in capsys.readouterr().err


def test_generate_prints_the_completion(capsys):
    assert main(["--log-level", "WARNING", "generate", "The capital of France is", "--max-tokens", "6",
                 "--num-kv-blocks", "16"]) == 0
    assert capsys.readouterr().out.startswith("The capital of France is Paris")


def test_chat_answers_each_line(capsys, monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n/exit\n"))
    assert main(["--log-level", "WARNING", "chat", "--temperature", "0", "--max-tokens", "16",
                 "--num-kv-blocks", "32"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_embed_prints_one_normalized_vector_per_text(capsys):
    assert main(["--log-level", "WARNING", "embed", "first text", "second text", "--dimensions", "8"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == ["first text", "second text"]
    assert all(len(line["embedding"]) == 8 for line in lines)
    assert abs(sum(x * x for x in lines[0]["embedding"]) - 1) < 1e-4
