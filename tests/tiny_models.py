"""Small random-weight checkpoints of the Llama / Qwen2 / Qwen3 shapes in ../shared/models and of the MoE
families (Qwen3-MoE, Qwen2-MoE, Mixtral), for parity tests.

Each folder holds config.json, model.safetensors (written by transformers) and a word-level tokenizer, so the
engine loads it exactly as it loads a real Hugging Face model.
"""
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig,
                          MixtralConfig, Phi3Config, Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig)

from wde.core.loader.dummy_model import write_word_level_tokenizer

VOCAB_SIZE = 512
EOS_ID = 1

# the features of the real shapes (GQA ratio, biases, tied heads, RoPE scaling), at a size CI can run; llama3's
# original window is shrunk to 512 so that, at head_dim 16, its three frequency bands (kept, smoothed, scaled)
# all occur
SHAPES = {
    "qwen3": lambda: Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                 tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen2": lambda: Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                                 rope_theta=1000000.0, rms_norm_eps=1e-6),
    # 8 experts, top-2, renormalized; layer 1 dense
    "qwen3_moe": lambda: Qwen3MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                        mlp_only_layers=[1], tie_word_embeddings=False, rope_theta=1000000.0,
                                        rms_norm_eps=1e-6),
    # 4 experts, top-2, a shared expert with its gate
    "qwen2_moe": lambda: Qwen2MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                        shared_expert_intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                        num_experts_per_tok=2, norm_topk_prob=False, tie_word_embeddings=False,
                                        rope_theta=1000000.0, rms_norm_eps=1e-6),
    "mixtral": lambda: MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, tie_word_embeddings=False, rope_theta=1000000.0,
                                     rms_norm_eps=1e-5),
    # a window of 4,096 (its config's default) over sequences of at most 1,024: attention over all of them
    "mistral": lambda: MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-5,
                                     sliding_window=4096),
    # LongRoPE's short factors (the sequences stay within its original 1,024 positions)
    "phi3": lambda: Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5,
                               original_max_position_embeddings=1024, pad_token_id=0,
                               rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)],
                                             "long_factor": [2.0 + i for i in range(8)]}),
    # local (window 8) and global layers in turn; caps small enough to bite on these random weights
    "gemma2": lambda: Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=3.0,
                                   final_logit_softcapping=4.0, rms_norm_eps=1e-6),
    # 5 local layers (window 8, RoPE base 10,000) to 1 global (base 1,000,000, scaled by 4), q/k norms
    "gemma3": lambda: Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       query_pre_attn_scalar=24, sliding_window=8, rms_norm_eps=1e-6,
                                       rope_parameters={"sliding_attention": {"rope_type": "default",
                                                                              "rope_theta": 10000.0},
                                                        "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                           "rope_theta": 1000000.0}}),
    "llama": lambda: LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                                 rope_theta=500000.0, rms_norm_eps=1e-5,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 512}),
}


def write_tiny_model(folder: Path, shape: str, seed: int = 0, **overrides) -> Path:
    """A random model of `shape` in `folder`.

    Weights are drawn wider than transformers' default (0.02), and an untied LM head wider still, so the
    model's greedy picks vary from token to token and win by clear margins (not by float rounding).
    """
    config = SHAPES[shape]()
    config.update({"vocab_size": VOCAB_SIZE, "max_position_embeddings": 1024, "eos_token_id": EOS_ID,
                   "bos_token_id": None, "initializer_range": 0.2, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if not config.tie_word_embeddings:
        with torch.no_grad():
            model.get_output_embeddings().weight.normal_(0, 0.4)
    model.save_pretrained(folder)
    write_word_level_tokenizer(folder, VOCAB_SIZE, EOS_ID)
    return folder
