"""At schedule time: tokenize a request and build its sequences."""
import torch

from wde.core import interfaces
from wde.core.request import Request
from wde.workflows.decoding.input_processor import check_prompt_fits
from wde.workflows.decoding.sequence import Sequence, SequenceGroup


class DecodingRequestProcessor(interfaces.RequestProcessor[SequenceGroup]):
    @classmethod
    def from_engine(cls, engine) -> "DecodingRequestProcessor":
        return cls(engine.config, engine.tokenizer, engine.kv_cache_manager, engine.structured_outputs)

    def __init__(self, config, tokenizer, kv_cache_manager,
                 structured_outputs: interfaces.StructuredOutputBackend | None = None):
        super().__init__(config)
        self.tokenizer = tokenizer
        self.structured_outputs = structured_outputs
        self.max_model_len = config.model.max_model_len
        # a sequence alone in the engine must always fit in the cache, or preemption could never make room
        self.max_seq_len = kv_cache_manager.longest_sequence(config.args.max_num_batched_tokens, self.max_model_len)

    def __call__(self, request: Request) -> SequenceGroup:
        prompt_ids = request.prompt_token_ids
        if prompt_ids is None:
            prompt_ids = self.tokenizer.encode(request.prompt)
            if not prompt_ids:
                raise ValueError("the prompt is empty after tokenization")
        prompt_len = len(prompt_ids)
        check_prompt_fits(prompt_len, self.max_model_len)
        if prompt_len >= self.max_seq_len:
            raise ValueError(f"the prompt has {prompt_len} tokens, and the KV cache holds only {self.max_seq_len} "
                             "tokens of one sequence: raise num_kv_blocks or kv_cache_memory_bytes")
        params = request.params
        room = self.max_seq_len - prompt_len
        max_output = room if params.max_tokens is None else min(params.max_tokens, room)
        grammar = None if request.grammar is None else request.grammar.result()  # raises what compiling raised
        group = SequenceGroup(request, prompt_ids)
        group.sequences = [self._sequence(group, i, max_output, grammar) for i in range(params.n)]
        return group

    def _sequence(self, group: SequenceGroup, index: int, max_output: int, grammar) -> Sequence:
        params, prompt_ids = group.params, group.prompt_token_ids
        seq = Sequence(group, index, list(prompt_ids), len(prompt_ids), max_output)
        if grammar is not None:  # each completion follows the constraint on its own
            seq.grammar = self.structured_outputs.new_matcher(grammar, prompt_ids)
        if params.seed is not None:  # completion i of a seeded request draws from seed + i (as an unsigned
            # 64-bit seed, the range torch takes: a negative seed or one near the top wraps instead of overflowing)
            seq.generator = torch.Generator(self.config.device).manual_seed((params.seed + index) % 2**64)
        if params.prompt_logprobs is not None and index == 0:  # the prompt is the same for all completions
            seq.prompt_logprobs = [None]
        return seq
