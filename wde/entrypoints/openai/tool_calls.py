"""OpenAI tool calling: what a tool_choice constrains the answer to, and the tool calls read back out of it.

tool_choice "required" or a named function: the answer is held (through structured outputs) to JSON of the calls
themselves, {"name": ..., "arguments": {...}} (a list of them for "required"), with each function's parameters
as the arguments' schema, whatever format the model's chat template would have used; so the calls always
parse and their arguments always validate. tool_choice "auto": the model writes freely, in its own format, and
the server's tool-call parser finds the calls in the text: `hermes` (Hermes, Qwen 2.5 / 3: `<tool_call>{...}
</tool_call>` blocks) or `llama3_json` (Llama 3.1+: the whole answer one {"name": ..., "parameters": ...} object,
after an optional `<|python_tag|>`).
"""
import json
import re
import uuid
from typing import Callable

TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def call_schema(function: dict) -> dict:
    """The JSON schema of one call of `function` (an OpenAI tool's "function" object)."""
    return {"type": "object", "properties": {"name": {"type": "string", "enum": [function["name"]]},
                                             "arguments": function.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def forced_schema(functions: list[dict], named: str | None) -> dict:
    """What the answer must be: one call of the function `named`, or (named None: "required") a list of one or
    more calls of any of `functions`."""
    if named is not None:
        chosen = [f for f in functions if f["name"] == named]
        if not chosen:
            raise ValueError(f"tool_choice names the function {named!r}, which is not among the tools")
        return call_schema(chosen[0])
    return {"type": "array", "minItems": 1, "items": {"anyOf": [call_schema(f) for f in functions]}}


def openai_call(name: str, arguments: object) -> dict:
    """A tool call in OpenAI's shape: the arguments as JSON text."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": text}}


def forced_calls(text: str) -> list[dict]:
    """The calls of an answer held to forced_schema(), which the constraint makes parse once complete; none when
    the answer ended before (a stop string of the client's cut it) or the schema allows nothing at all."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    calls = value if isinstance(value, list) else [value]
    if not all(isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call
               for call in calls):
        return []
    return [openai_call(call["name"], call["arguments"]) for call in calls]


def _json_call(text: str, arguments_key: str) -> dict | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not (isinstance(value, dict) and isinstance(value.get("name"), str)):
        return None
    return openai_call(value["name"], value.get(arguments_key, {}))


def parse_hermes(text: str) -> tuple[str | None, list[dict]]:
    """(the text outside the <tool_call> blocks or None when it is blank, the calls of the blocks that parse)."""
    calls = [call for block in TOOL_CALL_BLOCK.findall(text) if (call := _json_call(block, "arguments"))]
    if not calls:
        return text, []
    content = TOOL_CALL_BLOCK.sub("", text).strip()
    return content or None, calls


def parse_llama3_json(text: str) -> tuple[str | None, list[dict]]:
    """The whole answer (after <|python_tag|>) one JSON call with "parameters" (or "arguments"); else text."""
    body = text.removeprefix("<|python_tag|>").strip()
    call = _json_call(body, "parameters")
    if call is not None and call["function"]["arguments"] == "{}":
        call = _json_call(body, "arguments") or call
    return (None, [call]) if call is not None else (text, [])


TOOL_CALL_PARSERS: dict[str, Callable[[str], tuple[str | None, list[dict]]]] = {
    "hermes": parse_hermes, "llama3_json": parse_llama3_json}
