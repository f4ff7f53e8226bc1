"""SamplingParams: how to pick each generated token and when to stop, with vLLM's names and meanings."""
import enum

from pydantic import BaseModel, ConfigDict, Field

MAX_LOGPROBS = 20


class RequestOutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # every RequestOutput carries all text and tokens so far
    DELTA = "delta"  # every RequestOutput carries only what is new since the last one
    FINAL_ONLY = "final_only"  # one RequestOutput, when the request finishes


class SamplingParams(BaseModel):
    """Invalid values are refused when the object is made (or a field is set), naming the field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    n: int = Field(1, ge=1, description="independent completions per prompt")
    temperature: float = Field(1.0, ge=0.0, description="0 picks the most likely token (greedy)")
    max_tokens: int | None = Field(16, ge=1, description="most tokens to generate; None: up to max_model_len")
    stop_token_ids: list[int] = Field(default_factory=list, description="tokens that end the output")
    ignore_eos: bool = Field(False, description="keep generating after the end-of-sequence token")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="also return the log-probability of each sampled token and of "
                                             "this many most likely tokens")
    skip_special_tokens: bool = Field(True, description="leave special tokens out of the text")
    detokenize: bool = Field(True, description="produce text (False: token ids only)")
    output_kind: RequestOutputKind = Field(RequestOutputKind.CUMULATIVE,
                                           description="what LLMEngine.step() returns for this request")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
