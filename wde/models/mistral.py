"""Mistral: Llama's architecture (no biases, GQA, one RoPE base), whose configs may set one attention window for
every layer."""
from wde.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    one_window_for_all_layers = True
