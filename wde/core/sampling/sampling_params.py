"""SamplingParams: how to pick each generated token and when to stop, with vLLM's names and meanings."""
import enum
import json

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from wde.core.inputs import check_text

MAX_LOGPROBS = 20
MAX_N = 1024
INT32_MAX, INT64_MIN, INT64_MAX = 2**31 - 1, -2**63, 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
# a constraint's size: compiling it takes time that grows faster than its text (a 20 KB JSON schema nested 800
# deep took xgrammar 74 s, and a choice of 20,000 strings 17 s) and cannot be stopped once begun
MAX_CONSTRAINT_CHARS = 32 * 1024  # of a schema's JSON, a regex, a grammar, or the choices together
MAX_SCHEMA_DEPTH = 32  # objects and arrays nested in a JSON schema
MAX_CHOICES = 1024
# as vLLM: a temperature this small means greedy (dividing logits by it would overflow float32 into inf / NaN)
GREEDY_BELOW = 1e-5
# a penalized logit is divided or multiplied by repetition_penalty: outside this range it over- or underflows
REPETITION_PENALTY_RANGE = (1e-3, 1e3)


class RequestOutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # every RequestOutput carries all text and tokens so far
    DELTA = "delta"  # every RequestOutput carries only what is new since the last one
    FINAL_ONLY = "final_only"  # one RequestOutput, when the request finishes


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_schema_depth(schema: dict | str) -> None:
    """A JSON schema's objects and arrays nest at most MAX_SCHEMA_DEPTH deep (walked without recursion: what a
    client nests 5,000 deep must not reach Python's recursion limit)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except RecursionError:
            raise ValueError(f"structured_outputs.json nests more than {MAX_SCHEMA_DEPTH} deep") from None
        except ValueError as e:
            raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"structured_outputs.json must be a JSON schema, an object; it is {json.dumps(schema)[:80]}")
    level = [schema]
    for depth in range(MAX_SCHEMA_DEPTH + 1):
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, (dict, list))]
        if not level:
            return
    raise ValueError(f"structured_outputs.json nests more than {MAX_SCHEMA_DEPTH} deep")


class StructuredOutputsParams(BaseModel):
    """A constraint on the generated text, as vLLM names it: exactly one of the fields. Decoding then only
    samples tokens the constraint allows, and the sequence stops once the constraint is complete."""

    # `json` (vLLM's name) is the schema's alias: as a field name it would hide pydantic's own BaseModel.json
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    json_schema: dict | str | None = Field(None, alias="json",
                                           description="a JSON schema (an object, or its JSON text)")
    json_object: bool | None = Field(None, description="true: any JSON object")
    regex: str | None = Field(None, min_length=1, description="a regular expression the whole text matches")
    choice: list[str] | None = Field(None, min_length=1, description="the text is one of these strings")
    grammar: str | None = Field(None, min_length=1, description="an EBNF grammar (GBNF style, `root ::= ...`), "
                                                               "or a Lark grammar (`start: ...`)")

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputsParams":
        given = self._given()
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of json, json_object, regex, choice, grammar; "
                             f"got {', '.join(given) or 'none'}")
        for index, text in enumerate(self.choice or []):
            if not text.isascii() and not is_utf8(text):
                raise ValueError(f"structured_outputs.choice[{index}] is not unicode text (a lone surrogate)")
        if self.choice is not None and len(self.choice) > MAX_CHOICES:
            raise ValueError(f"structured_outputs.choice has {len(self.choice)} strings; at most {MAX_CHOICES}")
        schema = self.json_schema
        if isinstance(schema, dict):
            check_schema_depth(schema)  # first: a deep schema would take json.dumps past the recursion limit
        size = (len(self.regex or self.grammar or "") + sum(len(c) + 1 for c in self.choice or [])
                + (len(json.dumps(schema) if isinstance(schema, dict) else schema) if schema is not None else 0))
        if size > MAX_CONSTRAINT_CHARS:
            raise ValueError(f"structured_outputs.{given[0]} is {size} characters long; at most "
                             f"{MAX_CONSTRAINT_CHARS}")
        if isinstance(schema, str):
            check_schema_depth(schema)
        return self

    def _given(self) -> list[str]:
        return [field.alias or name for name, field in type(self).model_fields.items()
                if getattr(self, name) not in (None, False)]

    @property
    def kind(self) -> str:
        """Which constraint it is: json, json_object, regex, choice or grammar."""
        return self._given()[0]


class SamplingParams(BaseModel):
    """Invalid values are refused when the object is made (or a field is set), naming the field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    n: int = Field(1, ge=1, le=MAX_N, description="independent completions per prompt")
    temperature: float = Field(1.0, ge=0.0, le=FLOAT32_MAX, allow_inf_nan=False,
                               description=f"0 (or below {GREEDY_BELOW}) picks the most likely token (greedy)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False,
                         description="sample from the smallest set of most likely tokens whose probabilities add "
                                     "up to top_p")
    top_k: int = Field(0, ge=-1, le=INT32_MAX, description="sample from the k most likely tokens; 0 or -1: all")
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False,
                         description="drop tokens less likely than min_p times the most likely one")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False,
                                    description="subtracted from the logit of every token already generated")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False,
                                     description="subtracted from a token's logit once per time it was generated")
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1],
                                      allow_inf_nan=False,
                                      description="divides positive (multiplies negative) logits of tokens in the "
                                                  "prompt or output; 1: off")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX,
                             description="seed of this request's own random generator")
    stop: list[str] = Field(default_factory=list, description="strings that end the output")
    stop_token_ids: list[int] = Field(default_factory=list, description="tokens that end the output (checked "
                                                                        "against the vocabulary when submitted)")
    include_stop_str_in_output: bool = Field(False, description="keep the stop string in the text")
    ignore_eos: bool = Field(False, description="keep generating after the end-of-sequence token")
    max_tokens: int | None = Field(16, ge=1, le=INT64_MAX,
                                   description="most tokens to generate; None: up to max_model_len")
    min_tokens: int = Field(0, ge=0, le=INT64_MAX, description="generate at least this many tokens before EOS or a "
                                                               "stop token may end the output")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="also return the log-probability of each sampled token and of "
                                             "this many most likely tokens (with their ranks)")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                        description="the same for each prompt token")
    skip_special_tokens: bool = Field(True, description="leave special tokens out of the text")
    detokenize: bool = Field(True, description="produce text (False: token ids only)")
    output_kind: RequestOutputKind = Field(RequestOutputKind.CUMULATIVE,
                                           description="what LLMEngine.step() returns for this request")
    structured_outputs: StructuredOutputsParams | None = Field(
        None, description="constrain the text to a JSON schema, a regex, a grammar or a choice of strings")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value):
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop_string(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        for i, stop in enumerate(value):
            check_text(stop, f"stop string {i}")
        return value

    @field_validator("temperature")
    @classmethod
    def _tiny_temperature_is_greedy(cls, value: float) -> float:
        return 0.0 if value < GREEDY_BELOW else value

    @model_validator(mode="after")
    def _consistent(self) -> "SamplingParams":
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} is more than max_tokens={self.max_tokens}")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True")
        return self

    def __setattr__(self, name: str, value) -> None:
        """A new value is checked on a copy first: pydantic stores it before the checks across fields run, so
        a refused value would otherwise stay."""
        if name in type(self).model_fields:
            BaseModel.__setattr__(self.model_copy(), name, value)
        super().__setattr__(name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def truncates(self) -> bool:
        """top_k, top_p or min_p cut the distribution before sampling."""
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0
