"""The default Tokenizer component: a Hugging Face fast tokenizer, read from the model folder or .gguf file."""
import logging
import time

from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer

from wde.core import interfaces
from wde.core.config import EngineConfig, split_model_path
from wde.core.inputs import check_text
from wde.core.loader import gguf_cache
from wde.core.loader.hub import local_model_path

logger = logging.getLogger(__name__)


class HFTokenizer(interfaces.Tokenizer):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
        if config.args.tokenizer:
            tokenizer = local_model_path(config.args.tokenizer, None, config.args.download_dir)
            folder, gguf_file = split_model_path(tokenizer)
        else:
            folder, gguf_file = config.model.path, config.model.gguf_file
        start = time.perf_counter()
        source = gguf_cache.tokenizer_folder(f"{folder}/{gguf_file}") if gguf_file else folder  # read once
        self.hf = AutoTokenizer.from_pretrained(source)
        if not self.hf.is_fast:
            raise ValueError(f"the tokenizer in {folder} has no fast (Rust) version, which wde needs")
        logger.info("tokenizer loaded from %s in %.1f s", gguf_file or folder, time.perf_counter() - start)
        self.eos_token_id: int | None = self.hf.eos_token_id
        self.special_ids = frozenset(self.hf.all_special_ids)
        # a vocabulary entry's length counts the bytes (byte-level BPE) or characters it stands for
        self.max_token_chars = max(map(len, self.hf.get_vocab()), default=None)

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        return self.hf(text, add_special_tokens=add_special_tokens, truncation=max_length is not None,
                       max_length=max_length)["input_ids"]

    def encode_pair(self, first: str, second: str, max_length: int | None = None,
                    token_type_ids: bool = False) -> tuple[list[int], list[int] | None]:
        try:
            encoded = self.hf(first, second, truncation="only_second" if max_length else False,
                              max_length=max_length, return_token_type_ids=token_type_ids)
        except Exception as e:  # noqa: BLE001 - the Rust tokenizer's truncation error has no type of its own
            if "Truncation error" not in str(e):
                raise
            raise ValueError(f"the query and the separators alone take more than the {max_length} tokens the pair "
                             "is cut to (truncate_prompt_tokens, or max_model_len): only the document can be cut") \
                from e
        return encoded["input_ids"], encoded.get("token_type_ids")

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The conversation as the model's chat template writes it (with `tools`, OpenAI's tool definitions, for
        a template that describes them); ValueError naming what is wrong with it (a template may refuse a
        conversation, e.g. one whose roles do not alternate)."""
        if not self.hf.chat_template:
            raise ValueError("this model's tokenizer has no chat template; use generate() with a plain prompt")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise TypeError(f"message {i} is a {type(message).__name__}, not a dict with a role and content")
            for key, value in message.items():
                if isinstance(value, str):
                    check_text(value, f"message {i}'s {key}")
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                               tools=tools)
        except Exception as e:  # noqa: BLE001 - a template's own refusal (jinja's TemplateError) or a message of
            # a shape it cannot render: either way, what the conversation carries
            raise ValueError(f"the chat template could not render the conversation: {type(e).__name__}: {e}") \
                from e

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The token ids of the conversation's chat prompt (the template already holds the special tokens:
        tokenizing must not add a second BOS)."""
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


class IncrementalDecoder:
    """Text of a growing token sequence, one token at a time.

    The tokenizers library's DecodeStream holds back the bytes of an unfinished multi-byte character, so the
    text never shows a broken character and decoding stays O(1) per token.
    """

    def __init__(self, tokenizer: HFTokenizer, skip_special_tokens: bool):
        self._backend = tokenizer.hf.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._backend, token_id) or ""
