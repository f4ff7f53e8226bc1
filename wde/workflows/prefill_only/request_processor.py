"""At schedule time: tokenize an input (or a query / document pair), truncate it if asked, check its length."""
from array import array

from wde.core import interfaces
from wde.core.request import Request
from wde.workflows.prefill_only.sequence import PrefillOnlySequence


class PrefillOnlyRequestProcessor(interfaces.RequestProcessor[PrefillOnlySequence]):
    @classmethod
    def from_engine(cls, engine) -> "PrefillOnlyRequestProcessor":
        return cls(engine.config, engine.tokenizer, engine.workflow.causal, engine.kv_cache_manager)

    def __init__(self, config, tokenizer, causal: bool, kv_cache_manager):
        super().__init__(config)
        self.tokenizer = tokenizer
        self.causal = causal
        # segment ids mean something only to models with several token types (BERT; not XLM-RoBERTa)
        self.uses_token_types = getattr(config.model.hf_config, "type_vocab_size", 1) > 1
        self.max_model_len = config.model.max_model_len
        self.max_step_tokens = config.args.max_num_batched_tokens
        if causal:  # an input must fit in the KV cache on its own
            self.max_step_tokens = min(self.max_step_tokens, kv_cache_manager.num_blocks * kv_cache_manager.block_size)

    def __call__(self, request: Request) -> PrefillOnlySequence:
        limit = request.params.truncate_prompt_tokens
        if limit == -1:
            limit = self.max_model_len
        if isinstance(request.prompt, tuple):
            token_ids, token_type_ids = self._encode_pair(*request.prompt, limit)
        else:
            token_ids, token_type_ids = self._encode(request, limit), None
        if not token_ids:
            raise ValueError("the input is empty after tokenization")
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"the input has {len(token_ids)} tokens, more than max_model_len={self.max_model_len}; "
                             "set PoolingParams(truncate_prompt_tokens=...) to cut it")
        if len(token_ids) > self.max_step_tokens:
            raise ValueError(f"the input has {len(token_ids)} tokens, more than one step can take "
                             f"({self.max_step_tokens}): raise max_num_batched_tokens")
        return PrefillOnlySequence(request, token_ids, array("q", token_ids), token_type_ids)

    def _encode(self, request: Request, limit: int | None) -> list[int]:
        if request.prompt_token_ids is not None:
            return request.prompt_token_ids[:limit] if limit else request.prompt_token_ids
        return self.tokenizer.encode(request.prompt, max_length=limit)

    def _encode_pair(self, query, document, limit: int | None) -> tuple[list[int], list[int] | None]:
        if self.causal:
            # query tokens first and unchanged, so the query's KV is shared (prefix cache) by all its documents
            query_ids = query if isinstance(query, list) else self.tokenizer.encode(query)
            document_ids = document if isinstance(document, list) else self.tokenizer.encode(
                document, add_special_tokens=False)
            token_ids = query_ids + document_ids
            return (token_ids[:limit] if limit else token_ids), None
        if isinstance(query, list) or isinstance(document, list):
            raise TypeError("a cross-encoder scores text pairs (its tokenizer places the separators)")
        return self.tokenizer.encode_pair(query, document, max_length=limit, token_type_ids=self.uses_token_types)
