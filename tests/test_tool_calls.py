"""Reading tool calls back out of an answer, and what a forced tool_choice holds the answer to."""
import json

import jsonschema
import pytest

from wde.entrypoints.openai.tool_calls import forced_calls, forced_schema, parse_hermes, parse_llama3_json

WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                  "required": ["city"]}}
TIME = {"name": "get_time"}


def test_hermes_blocks_become_calls_and_the_rest_stays_content():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    content, calls = parse_hermes(text)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2


@pytest.mark.parametrize("text", ["no tools here", "<tool_call>not json</tool_call>",
                                  '<tool_call>{"arguments": {}}</tool_call>', "<tool_call>{\"name\": 3}</tool_call>"])
def test_text_without_a_well_formed_call_is_content(text):
    assert parse_hermes(text) == (text, [])


def test_llama3_json_reads_one_object_after_the_python_tag():
    content, calls = parse_llama3_json('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}')
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    assert parse_llama3_json('{"name": "get_time", "arguments": {"tz": "UTC"}}')[1][0]["function"]["arguments"] \
        == '{"tz": "UTC"}'
    assert parse_llama3_json("It is sunny.") == ("It is sunny.", [])


def test_a_forced_answer_is_a_call_whose_arguments_fit_the_parameters():
    one = forced_schema([WEATHER, TIME], "get_weather")
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, one)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_time", "arguments": {}}, one)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {}}, one)
    required = forced_schema([WEATHER, TIME], None)
    jsonschema.validate([{"name": "get_time", "arguments": {"anything": 1}}], required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], required)
    [call] = forced_calls('{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    with pytest.raises(ValueError, match="not among the tools"):
        forced_schema([WEATHER], "get_time")


def test_the_chat_template_gets_the_tools(tiny_model_dir):
    from wde import LLMEngine
    tokenizer = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=8).tokenizer
    tokenizer.hf.chat_template = ("{% if tools %}tools:{% for t in tools %} {{ t.function.name }}{% endfor %}; "
                                  "{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    tools = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tools=tools) == "tools: get_weather get_time; user: hi\n"
    assert tokenizer.apply_chat_template(messages) == "user: hi\n"
