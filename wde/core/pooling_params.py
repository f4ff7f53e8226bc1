"""PoolingParams: what a prefill-only request returns, with vLLM's names and meanings."""
from pydantic import BaseModel, ConfigDict, Field, field_validator

from wde.core.sampling.sampling_params import INT32_MAX


class PoolingParams(BaseModel):
    """Invalid values are refused when the object is made (or a field is set), naming the field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    normalize: bool | None = Field(None, description="L2-normalize embeddings; None: as the model's own "
                                                     "pooling config says")
    dimensions: int | None = Field(None, ge=1, le=INT32_MAX, description="keep the first dimensions of the embedding "
                                                           "(Matryoshka models), normalized again if normalizing")
    activation: bool = Field(True, description="scores and classes as probabilities (sigmoid / softmax) rather "
                                               "than raw logits")
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=INT32_MAX,
                                               description="cut longer inputs to this many tokens (-1: "
                                                           "max_model_len) instead of refusing them")

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keeps_a_token(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("0 would leave no token: give -1 (max_model_len) or a positive count")
        return value
