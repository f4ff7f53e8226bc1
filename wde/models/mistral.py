"""Mistral: Llama's architecture (no biases, GQA, one RoPE base), whose configs may set one attention window for
every layer."""
from wde.core.config import ModelConfig
from wde.models.llama import LlamaForCausalLM, check_window_covers_every_sequence


class MistralForCausalLM(LlamaForCausalLM):
    def __init__(self, model_config: ModelConfig):
        check_window_covers_every_sequence(model_config)
        super().__init__(model_config)
