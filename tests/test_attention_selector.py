import logging

import pytest
import torch

from wde import LLMEngine
from wde.core.attention.flash_attn_backend import FlashAttnBackend
from wde.core.attention.triton_backend import TritonAttentionBackend
from wde.core.config import EngineArgs, EngineConfig


def test_auto_on_cpu_is_the_workflows_backend_and_is_logged(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="wde.core.attention.selector"):
        engine = LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), num_kv_blocks=4)
    assert type(engine.executor.worker.attn_backend).__name__ == "TorchAttentionBackend"
    assert "attention backend: TorchAttentionBackend (auto" in caplog.text


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown attention_backend 'fast'; known: auto, torch, triton"):
        LLMEngine.from_engine_args(attention_backend="fast", num_kv_blocks=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CPU machine flash-attn can never run")
def test_flash_attn_asked_for_where_it_cannot_run(tiny_model_dir):
    with pytest.raises(ValueError, match="attention_backend 'flash_attn' cannot run here: "):
        LLMEngine.from_engine_args(model=tiny_model_dir("qwen3"), attention_backend="flash_attn", num_kv_blocks=4)


def test_availability_reasons(tiny_model_dir):
    config = EngineConfig.from_args(EngineArgs(model=tiny_model_dir("qwen3"), block_size=16))
    assert "256" in FlashAttnBackend.is_available(config) or "not installed" in FlashAttnBackend.is_available(config)
    assert TritonAttentionBackend.is_available(config) is None
    config.model.hf_config.head_dim = 96  # Phi-3's: the kernels compute on padded heads of 128
    assert TritonAttentionBackend.is_available(config) is None


def test_a_backend_of_the_wrong_kind_is_refused():
    from wde.core.config import default_embed_model_path
    with pytest.raises(ValueError, match="'triton' computes paged attention; this workflow needs encoder"):
        LLMEngine.from_engine_args(model=default_embed_model_path(), attention_backend="triton")
