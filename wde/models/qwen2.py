"""Qwen2: Llama with a bias on the q/k/v projections (and none on the output projection)."""
from transformers import PretrainedConfig

from wde.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config: PretrainedConfig) -> dict:
        return {"qkv_bias": True, "o_bias": False, "qk_norm": False}
