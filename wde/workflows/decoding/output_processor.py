"""Sampled tokens -> sequences grown by one token, stop decisions, text, and RequestOutputs."""
from wde.core import interfaces
from wde.core.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from wde.core.request import Request
from wde.core.sampler import SamplerOutput
from wde.core.sampling_params import RequestOutputKind
from wde.workflows.decoding.scheduler import SchedulerOutput
from wde.workflows.decoding.sequence import Sequence, SequenceGroup


def eos_token_ids(tokenizer, hf_config) -> frozenset[int]:
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(hf_config, "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return frozenset(i for i in ids if i is not None)


class DecodingOutputProcessor(interfaces.OutputProcessor):
    @classmethod
    def from_engine(cls, engine) -> "DecodingOutputProcessor":
        return cls(engine.config, engine.tokenizer)

    def __init__(self, config, tokenizer):
        super().__init__(config)
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids(tokenizer, config.model.hf_config)

    def __call__(self, scheduler_output: SchedulerOutput, sampler_output: SamplerOutput | None
                 ) -> list[RequestOutput]:
        outputs = [failed_output(request, error) for request, error in scheduler_output.failed]
        sampled = [s.seq for s in scheduler_output.scheduled if s.samples]
        groups: dict[int, SequenceGroup] = {}  # the groups that moved this step, in order
        for row, seq in enumerate(sampled):
            self._append_token(seq, sampler_output, row)
            groups[id(seq.group)] = seq.group
        for group in groups.values():
            output = self._request_output(group)
            if output is not None:
                outputs.append(output)
        return outputs

    def _append_token(self, seq: Sequence, sampler_output: SamplerOutput, row: int) -> None:
        token = sampler_output.token_ids[row]
        seq.token_ids.append(token)
        params = seq.params
        if params.logprobs is not None:
            self._append_logprobs(seq, sampler_output, row)
        if params.detokenize:
            if seq.decoder is None:
                seq.decoder = self.tokenizer.decode_stream(params.skip_special_tokens)
            seq.text += seq.decoder.step(token)
        if token in self.eos_token_ids and not params.ignore_eos:
            seq.finish("stop")
        elif token in params.stop_token_ids:
            seq.finish("stop", stop_reason=token)
        elif seq.num_output_tokens >= seq.max_output_tokens:
            seq.finish("length")

    def _append_logprobs(self, seq: Sequence, out: SamplerOutput, row: int) -> None:
        token, k = seq.token_ids[-1], seq.params.logprobs
        entry: TokenLogprobs = {token: Logprob(out.token_logprobs[row], out.token_ranks[row])}
        for rank, (top_id, top_logprob) in enumerate(zip(out.top_ids[row][:k], out.top_logprobs[row][:k]), 1):
            entry.setdefault(top_id, Logprob(top_logprob, rank))
        if seq.params.detokenize:
            for token_id, logprob in entry.items():
                logprob.decoded_token = self.tokenizer.decode([token_id], skip_special_tokens=False)
        if seq.logprobs is None:
            seq.logprobs, seq.cumulative_logprob = [], 0.0
        seq.logprobs.append(entry)
        seq.cumulative_logprob += out.token_logprobs[row]

    def _request_output(self, group: SequenceGroup) -> RequestOutput | None:
        kind = group.params.output_kind
        finished = group.is_finished
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        completions = [completion_output(seq, delta=kind is RequestOutputKind.DELTA) for seq in group.sequences]
        return RequestOutput(group.request_id, group.request.prompt, group.prompt_token_ids, completions, finished)


def completion_output(seq: Sequence, delta: bool) -> CompletionOutput:
    first_token, first_char = (seq.num_emitted_tokens, seq.num_emitted_chars) if delta else (0, 0)
    token_ids = seq.output_token_ids[first_token:]
    logprobs = seq.logprobs[first_token:] if seq.logprobs is not None else None
    seq.num_emitted_tokens, seq.num_emitted_chars = seq.num_output_tokens, len(seq.text)
    return CompletionOutput(seq.index, seq.text[first_char:], token_ids, seq.cumulative_logprob, logprobs,
                            seq.finish_reason, seq.stop_reason)


def failed_output(request: Request, error: str) -> RequestOutput:
    completion = CompletionOutput(0, "", [], finish_reason="error")
    return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids or [], [completion],
                         finished=True, error=error)
