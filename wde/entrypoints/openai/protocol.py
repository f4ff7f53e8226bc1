"""Request bodies of the OpenAI API (and the Cohere / Jina rerank API), as pydantic models that refuse unknown
fields and out-of-range values; and the sampling settings each one asks for."""
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from wde.core.inputs import check_text
from wde.core.sampling.sampling_params import (INT32_MAX, INT64_MAX, INT64_MIN, RequestOutputKind, SamplingParams,
                                               StructuredOutputsParams)
from wde.entrypoints.openai.tool_calls import forced_schema

TokenIds = list[int]
# the most prompts (times n) or inputs one request may carry: OpenAI's cap on embeddings inputs. The engine serves
# requests first come, first served: one request of 100,000 prompts would hold every other client for minutes.
MAX_INPUTS_PER_REQUEST = 2048


def valid_text(text: str) -> str:
    return check_text(text, "the text")


# text the engine reads: JSON can carry a lone surrogate ("\\ud800"), which no tokenizer takes
Text = Annotated[str, AfterValidator(valid_text)]


def not_empty(value: list | str) -> list | str:
    if isinstance(value, list) and not value:
        raise ValueError("must not be an empty list")
    return value


class Request(BaseModel):
    # strict: JSON's types as sent (true is no token id, "5" no max_tokens), as the Python API takes them
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Request):
    include_usage: bool = False


class JsonSchemaFormat(Request):
    name: str = Field(max_length=64)
    description: str | None = None
    # OpenAI's own field name; pydantic's BaseModel has a `schema` method, hence the alias
    json_schema: dict = Field(alias="schema")
    strict: bool | None = None  # wde always holds the output to the schema


class ResponseFormat(Request):
    """OpenAI's response_format: text (no constraint), any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def schema_given(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format of type json_schema takes a json_schema, and only that type does")
        return self

    def structured_outputs(self) -> dict | None:
        if self.type == "json_object":
            return {"json_object": True}
        return None if self.type == "text" else {"json": self.json_schema.json_schema}


class SamplingFields(Request):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str
    n: int = Field(1, ge=1, le=16)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extensions, which load generators send to fix the length of every answer
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    # the constraint on the text: OpenAI's response_format, vLLM's structured_outputs, or its older guided_*
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    _constraint: StructuredOutputsParams | None = PrivateAttr(None)  # made once, by one_constraint

    @model_validator(mode="after")
    def one_constraint(self) -> "SamplingFields":
        self._constraint = self.constraint()  # refused with the body, as a 400, not once the request runs
        return self

    def constraint(self) -> StructuredOutputsParams | None:
        """The one constraint the request asked for, however it asked."""
        guided = {name: value for name, value in (("json", self.guided_json), ("regex", self.guided_regex),
                                                  ("choice", self.guided_choice), ("grammar", self.guided_grammar))
                  if value is not None}
        asked = [spec for spec in (self.response_format and self.response_format.structured_outputs(),
                                   self.structured_outputs, guided or None) if spec]
        if len(asked) > 1:
            raise ValueError("response_format, structured_outputs and guided_* each set a constraint: give one")
        if not asked or isinstance(asked[0], StructuredOutputsParams):
            return asked[0] if asked else None
        try:
            return StructuredOutputsParams.model_validate(asked[0])
        except ValidationError as e:  # named as the client sent it: guided_regex, or response_format's schema
            prefix = "guided_" if asked[0] is guided else "response_format."
            raise ValueError("; ".join(f"{prefix}{'.'.join(map(str, error['loc'])) or next(iter(asked[0]))}: "
                                       f"{error['msg']}" for error in e.errors())) from None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        return SamplingParams(structured_outputs=self._constraint,
            n=self.n, temperature=self.temperature, top_p=self.top_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop=self.stop, max_tokens=max_tokens,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY)


class CompletionRequest(SamplingFields):
    prompt: Annotated[Text | list[Text] | TokenIds | list[TokenIds], AfterValidator(not_empty)]
    max_tokens: int | None = Field(16, ge=1, le=INT64_MAX)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False  # the prompt before the completion; with logprobs, the prompt's log-probabilities too

    def prompts(self) -> list[str | TokenIds]:
        return one_or_many(self.prompt)

    @model_validator(mode="after")
    def not_too_many(self) -> "CompletionRequest":
        if len(self.prompts()) * self.n > MAX_INPUTS_PER_REQUEST:
            raise ValueError(f"{len(self.prompts())} prompts x n={self.n} is more than the "
                             f"{MAX_INPUTS_PER_REQUEST} completions one request may ask for: split it")
        return self

    @model_validator(mode="after")
    def stream_options_need_stream(self) -> "CompletionRequest":
        return check_stream_options(self)

    def completion_params(self) -> SamplingParams:
        """echo with logprobs asks for the prompt's log-probabilities (how lm-eval scores a text)."""
        return self.sampling_params(self.max_tokens, self.logprobs,
                                    self.logprobs if self.echo and self.logprobs is not None else None)


def one_or_many(value: str | list) -> list:
    """A field that takes one text or token-id list, or a list of them: always the list."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        return [value]
    return list(value)


class ContentPart(Request):
    """One part of a message's content. wde serves text models: a part of another type (image_url,
    input_audio, file) is refused by name."""

    type: Literal["text"]
    text: Text

    @model_validator(mode="before")
    @classmethod
    def text_only(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") != "text":
            raise ValueError(f"content parts of type {value.get('type')!r} are not supported: this server reads "
                             "text only ({'type': 'text', 'text': ...})")
        return value


class FunctionCall(Request):
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCall(Request):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    # a string, or a list of text parts (what many clients send); null only for an assistant turn
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: Text | None = None  # a tool's answer: to which call

    @model_validator(mode="after")
    def content_given(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (null is only for an assistant message)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        return self

    def for_template(self) -> dict:
        """The message as chat templates read it: content as one string (text parts joined by newlines, as
        vLLM joins them; an assistant's null content as "")."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls is not None:  # templates read each call's function name and arguments
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: Text | None = None
    parameters: dict | None = None  # a JSON schema of the arguments
    strict: bool | None = None  # wde holds forced calls to the schema always


class Tool(Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Request):
    name: str


class NamedToolChoice(Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def tool_choice_names_a_tool(self) -> "ChatCompletionRequest":
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice needs tools")
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("two tools have the same function name")
        return self

    def named_tool(self) -> str | None:
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

    def calls_tools(self) -> bool:
        """Whether tool calls may come back: tools given, and tool_choice not "none"."""
        return bool(self.tools) and self.tool_choice != "none"

    def forces_tool_calls(self) -> bool:
        return self.calls_tools() and (self.tool_choice == "required" or self.named_tool() is not None)

    def template_tools(self) -> list[dict] | None:
        """The tools as chat templates read them (transformers' apply_chat_template(tools=...))."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.calls_tools() else None

    def constraint(self) -> StructuredOutputsParams | None:
        """A forced tool call is a constraint too: the JSON of the calls (tool_calls.forced_schema)."""
        asked = super().constraint()
        if not self.forces_tool_calls():
            return asked
        if asked is not None:
            raise ValueError("tool_choice forces a tool call: it takes no other constraint (response_format, "
                             "structured_outputs, guided_*)")
        schema = forced_schema([tool.function.model_dump(exclude_none=True) for tool in self.tools],
                               self.named_tool())
        if not self.parallel_tool_calls and schema["type"] == "array":
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)

    def token_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def top_logprobs_need_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return check_stream_options(self)


def check_stream_options(request: SamplingFields) -> SamplingFields:
    if request.stream_options is not None and not request.stream:
        raise ValueError("stream_options is only for a streamed request (stream: true)")
    return request


class InputsRequest(Request):
    """A request over one or more inputs: texts or token-id lists."""

    model: str
    input: Annotated[Text | list[Text] | TokenIds | list[TokenIds], AfterValidator(not_empty)]
    user: str | None = None

    def inputs(self) -> list[str | TokenIds]:
        return one_or_many(self.input)

    @model_validator(mode="after")
    def not_too_many(self) -> "InputsRequest":
        if len(self.inputs()) > MAX_INPUTS_PER_REQUEST:
            raise ValueError(f"{len(self.inputs())} inputs is more than the {MAX_INPUTS_PER_REQUEST} one request "
                             "may carry: split it")
        return self


class EmbeddingRequest(InputsRequest):
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=INT32_MAX)


class ClassificationRequest(InputsRequest):
    """vLLM's /v1/classify: each input's class probabilities, and the most likely class's label."""


class RerankDocument(Request):
    text: Text


class RerankRequest(Request):
    """Cohere's and Jina's rerank request."""

    model: str
    query: Text
    documents: list[Text | RerankDocument] = Field(min_length=1, max_length=MAX_INPUTS_PER_REQUEST)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class ScoreRequest(Request):
    """vLLM's /v1/score: text_1 against each of text_2 (one to many), or pair by pair (two lists as long)."""

    model: str
    text_1: Annotated[Text | list[Text], AfterValidator(not_empty)]
    text_2: Annotated[Text | list[Text], AfterValidator(not_empty)]

    @model_validator(mode="after")
    def lengths_match(self) -> "ScoreRequest":
        first, second = one_or_many(self.text_1), one_or_many(self.text_2)
        if len(first) > 1 and len(first) != len(second):
            raise ValueError(f"text_1 holds {len(first)} texts and text_2 {len(second)}: give one text_1, or as "
                             "many as text_2")
        if len(second) > MAX_INPUTS_PER_REQUEST:
            raise ValueError(f"{len(second)} pairs is more than the {MAX_INPUTS_PER_REQUEST} one request may carry")
        return self

    def pairs(self) -> list[tuple[str, str]]:
        first, second = one_or_many(self.text_1), one_or_many(self.text_2)
        return list(zip(first * len(second) if len(first) == 1 else first, second))


class TokenizeRequest(Request):
    """vLLM's /tokenize: a prompt, or a conversation through the model's chat template."""

    model: str
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # for a prompt (a chat template holds its own)
    add_generation_prompt: bool = True  # for messages
    return_token_strs: bool = False

    @model_validator(mode="after")
    def one_of_prompt_or_messages(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(Request):
    model: str
    tokens: TokenIds
