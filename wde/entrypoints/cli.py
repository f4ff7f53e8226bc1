"""The `wde` command: generate text or chat (default model: the embedded SmolLM2), or embed texts (default:
all-MiniLM-L6-v2); --model takes any HF folder or .gguf file."""
import argparse
import gc
import json
import logging
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from wde.core.config import EngineArgs
from wde.entrypoints.openai.tool_calls import TOOL_CALL_PARSERS

logger = logging.getLogger("wde")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per EngineArgs field, so the CLI never falls behind the engine's arguments."""
    group = parser.add_argument_group("engine arguments")
    group.add_argument("--config", metavar="FILE", help="YAML or JSON file of engine arguments "
                                                        "(flags given here override it)")
    for name, field in EngineArgs.model_fields.items():
        flag, annotation = "--" + name.replace("_", "-"), field.annotation
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)  # X | None
        scalar = [t for t in typing.get_args(annotation) if t is not type(None)] if union else [annotation]
        if scalar == [bool]:  # bool, or bool | None (None: the engine decides)
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        elif typing.get_origin(scalar[0]) is typing.Literal:  # a Literal, or a Literal | None
            group.add_argument(flag, choices=typing.get_args(scalar[0]), default=None, help=field.description)
        else:
            group.add_argument(flag, type=scalar[0], default=None, help=field.description)


def read_config_file(path: str) -> dict[str, Any]:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml  # PyYAML comes with transformers
        values = yaml.safe_load(text)
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of engine arguments")
    return values


def engine_args_from(namespace: argparse.Namespace) -> EngineArgs:
    values = read_config_file(namespace.config) if namespace.config else {}
    values.update({name: getattr(namespace, name) for name in EngineArgs.model_fields
                   if getattr(namespace, name) is not None})
    return EngineArgs(**values)


def sampling_params_from(namespace: argparse.Namespace):
    from wde.core.sampling.sampling_params import SamplingParams
    return SamplingParams(temperature=namespace.temperature, max_tokens=namespace.max_tokens)


def run_generate(namespace: argparse.Namespace) -> None:
    from wde.entrypoints.llm import LLM
    llm = LLM(**engine_args_from(namespace).model_dump())
    outputs = llm.generate(namespace.prompts, sampling_params_from(namespace), use_tqdm=False)
    for output in outputs:
        if output.error:
            print(f"error: {output.error}", file=sys.stderr)
        else:
            print(output.prompt + output.outputs[0].text)


def run_chat(namespace: argparse.Namespace) -> None:
    from wde.entrypoints.llm import LLM
    llm = LLM(**engine_args_from(namespace).model_dump())
    params = sampling_params_from(namespace)
    messages = [{"role": "system", "content": namespace.system}] if namespace.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        reply = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)


def run_embed(namespace: argparse.Namespace) -> None:
    """One JSON line per text: {"text": ..., "embedding": [...]}."""
    from wde.core.config import default_embed_model_path
    from wde.core.pooling_params import PoolingParams
    from wde.entrypoints.llm import LLM
    args = engine_args_from(namespace)
    if args.model is None:
        args = args.model_copy(update={"model": default_embed_model_path()})
    llm = LLM(**args.model_dump())
    params = PoolingParams(dimensions=namespace.dimensions, normalize=False if namespace.no_normalize else None)
    for text, output in zip(namespace.texts, llm.embed(namespace.texts, params, use_tqdm=False)):
        if output.error:
            print(f"error: {output.error}", file=sys.stderr)
        else:
            print(json.dumps({"text": text, "embedding": [round(x, 6) for x in output.outputs.embedding]}))


def run_plugins(namespace: argparse.Namespace) -> None:
    """Every plugin in the wde.plugins entry-point group, and what loading it did."""
    from wde.core.plugins import load_plugins
    statuses = load_plugins()
    if not statuses:
        print("no wde plugins installed (entry-point group wde.plugins)")
    for status in statuses:
        line = f"{status.name:24} {status.status:28} {status.value}  [{status.distribution or '?'}]"
        print(line + (f"\n    {status.error}" if status.error else ""))


def served_name(model: str) -> str:
    path = Path(model)
    if not path.exists():  # a Hub id is served under its own name, as vLLM does
        return model
    return path.stem if path.suffix == ".gguf" else (path.parent.name if path.name == "model" else path.name)


def run_serve(namespace: argparse.Namespace) -> None:
    """The OpenAI-compatible server over the chat model (default: SmolLM2) and, optionally, an embedding or
    scoring model; each engine runs in its own process (this one does HTTP and tokenization)."""
    import uvicorn

    from wde.core.config import default_model_path
    from wde.entrypoints.openai.api_server import build_app
    from wde.entrypoints.openai.process_engine import start_engines
    args = engine_args_from(namespace)
    model = args.model or default_model_path()
    served = {namespace.served_model_name or served_name(model): args.model_copy(update={"model": model})}
    if namespace.embed_model:
        served[served_name(namespace.embed_model)] = EngineArgs(model=namespace.embed_model, device=args.device,
                                                                task=namespace.embed_task,
                                                                download_dir=args.download_dir)
    engines = start_engines(served)
    # uvicorn raises the signal that stopped it again once it is done: a SIGTERM must then unwind (stopping the
    # engines below), not end this process on the spot
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        app = build_app(engines, namespace.api_key, namespace.max_body_bytes, namespace.tool_call_parser,
                        namespace.reasoning_parser)
        # what start-up made (transformers, the tokenizers, the app) is never walked by the collector again: a
        # full collection over it stopped every stream for ~300 ms, three times in a 27 s W6 run on an H200
        gc.collect()
        gc.freeze()
        logger.info("serving %s on http://%s:%d", ", ".join(engines), namespace.host, namespace.port)
        uvicorn.run(app, host=namespace.host, port=namespace.port, log_level=namespace.log_level.lower(),
                    access_log=namespace.access_log, timeout_graceful_shutdown=namespace.shutdown_timeout)
    finally:
        for engine in engines.values():
            engine.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wde", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete one or more prompts")
    generate.add_argument("prompts", nargs="+", help="prompt text")
    generate.set_defaults(run=run_generate, temperature=0.0, max_tokens=32)

    chat = commands.add_parser("chat", help="chat on stdin, one message per line (/exit to stop)")
    chat.add_argument("--system", help="system message")
    chat.set_defaults(run=run_chat, temperature=0.7, max_tokens=256)

    embed = commands.add_parser("embed", help="embed texts (default model: all-MiniLM-L6-v2); JSON lines out")
    embed.add_argument("texts", nargs="+", help="text to embed")
    embed.add_argument("--dimensions", type=int, help="keep the first dimensions (Matryoshka models)")
    embed.add_argument("--no-normalize", action="store_true", help="do not L2-normalize")
    embed.set_defaults(run=run_embed)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="every request then needs Authorization: Bearer KEY")
    serve.add_argument("--served-model-name", help="the name clients ask for (default: from the model's path)")
    serve.add_argument("--embed-model", help="a second model, for /v1/embeddings, /v1/rerank, /v1/score or "
                                             "/v1/classify")
    serve.add_argument("--embed-task", default="auto", choices=["auto", "embed", "score", "classify"],
                       help="what the second model serves (auto: its architecture's task)")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="largest request body")
    serve.add_argument("--tool-call-parser", choices=sorted(TOOL_CALL_PARSERS), default="hermes",
                       help="how tool calls are read out of an answer with tool_choice auto (the model's format)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds a stop (SIGTERM, Ctrl+C) "
                                                                             "waits for open requests to finish")
    serve.add_argument("--access-log", action="store_true", help="log a line per HTTP request (off: at load, "
                                                                 "the lines cost the server time)")
    serve.set_defaults(run=run_serve)

    plugins = commands.add_parser("plugins", help="list the installed plugins and whether they load")
    plugins.set_defaults(run=run_plugins)

    for sub in (generate, chat):
        sub.add_argument("--max-tokens", type=int, help="most tokens to generate per answer")
        sub.add_argument("--temperature", type=float, help="0 for greedy")
    for sub in (generate, chat, embed, serve):
        add_engine_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    namespace = build_parser().parse_args(argv)
    logging.basicConfig(level=namespace.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        namespace.run(namespace)
    except (ValidationError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"wde {namespace.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
