"""Small random-weight BERT and XLM-RoBERTa checkpoints (the shapes of ../shared/models, fewer and narrower
layers), with all-MiniLM-L6-v2's WordPiece tokenizer so that query / document pairs get real separators."""
import shutil
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForSequenceClassification, BertConfig, XLMRobertaConfig

from wde.core.config import default_embed_model_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
ARCHITECTURES = {
    "bert": (BertConfig, dict(type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0)),
    "xlm-roberta": (XLMRobertaConfig, dict(type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1)),
}


def write_encoder(folder: Path, family: str, num_labels: int | None = None, seed: int = 0) -> Path:
    """A random encoder (BertModel / XLMRobertaModel), or with a classification head of num_labels."""
    config_class, extra = ARCHITECTURES[family]
    config = config_class(vocab_size=30522, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                          intermediate_size=128, max_position_embeddings=256, hidden_act="gelu",
                          initializer_range=0.2, num_labels=num_labels or 2, **extra)
    torch.manual_seed(seed)
    model = (AutoModelForSequenceClassification if num_labels else AutoModel).from_config(config)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(default_embed_model_path()) / name, folder / name)
    return folder
