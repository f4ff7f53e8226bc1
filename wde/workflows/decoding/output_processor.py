"""Sampled tokens -> sequences grown by one token, stop decisions, text, and RequestOutputs."""
from wde.core import interfaces
from wde.core.engine.failures import Failure, RequestContentError, RequestFailures
from wde.core.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from wde.core.sampling.sampler import SamplerOutput
from wde.core.sampling.sampler import TokenLogprobs as BatchLogprobs
from wde.core.sampling.sampling_params import RequestOutputKind
from wde.workflows.decoding.scheduler import SchedulerOutput
from wde.workflows.decoding.sequence import Sequence, SequenceGroup
from wde.workflows.decoding.stop_checker import StopChecker, eos_token_ids, visible_text_length


class DecodingOutputProcessor(interfaces.OutputProcessor[SchedulerOutput, SamplerOutput, RequestOutput]):
    STAGE = "making the outputs"

    @classmethod
    def from_engine(cls, engine) -> "DecodingOutputProcessor":
        return cls(engine.config, engine.tokenizer, engine.failures)

    def __init__(self, config, tokenizer, failures: RequestFailures | None = None):
        super().__init__(config)
        self.tokenizer = tokenizer
        self.failures = failures if failures is not None else RequestFailures()  # standalone: its own
        self.stop_checker = StopChecker(eos_token_ids(tokenizer, config.model.hf_config))

    def __call__(self, scheduler_output: SchedulerOutput, sampler_output: SamplerOutput) -> list[RequestOutput]:
        """Each request's part runs on its own: one that raises (detokenizing, a stop check, its logprobs) is
        recorded as failed and left out; the engine then aborts it and reports why."""
        failures = self.failures
        for index, logprobs in sampler_output.prompt_logprobs:
            seq = scheduler_output.scheduled[index].seq
            try:
                self._add_prompt_logprobs(seq, logprobs)
            except Exception as e:  # noqa: BLE001
                failures.record(seq.request, self.STAGE, e)
        sampled = [s for s in scheduler_output.scheduled if s.samples]
        groups: dict[int, SequenceGroup] = {}  # the groups that moved this step, in order
        for row, item in enumerate(sampled):
            seq = item.seq
            # aborted, or (async scheduling) stopped by the step before, or its input replaced: the token is dropped
            if seq.is_finished or item.rewound:
                continue
            try:
                self._append_token(seq, sampler_output, row)
            except Exception as e:  # noqa: BLE001
                failures.record(seq.request, self.STAGE, e)
            groups[id(seq.group)] = seq.group
        outputs = []
        for group in groups.values():
            try:
                output = None if failures.has_failed(group.request_id) else request_output(group)
            except Exception as e:  # noqa: BLE001
                failures.record(group.request, self.STAGE, e)
                continue
            if output is not None:
                outputs.append(output)
        return outputs

    def failed_output(self, failure: Failure) -> RequestOutput:
        request = failure.request
        completion = CompletionOutput(0, "", [], finish_reason="error")
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids or [], [completion],
                             finished=True, error=failure.message, internal_error=failure.internal)

    def _add_prompt_logprobs(self, seq: Sequence, logprobs: BatchLogprobs) -> None:
        detokenize, k = seq.params.detokenize, seq.params.prompt_logprobs
        seq.prompt_logprobs.extend(self._logprob_entry(logprobs, row, k, detokenize)
                                   for row in range(len(logprobs.token_ids)))

    def _append_token(self, seq: Sequence, sampler_output: SamplerOutput, row: int) -> None:
        seq.num_pending_tokens -= 1
        grammar = seq.grammar
        if (grammar is not None and not grammar.accept_token(sampler_output.token_ids[row])
                and not sampler_output.take_runner_up(row, grammar.accept_token)):
            raise RequestContentError(constraint_dead_end(seq))  # the mask let nothing else through
        token = sampler_output.token_ids[row]
        seq.token_ids.append(token)
        params = seq.params
        if params.logprobs is not None:
            if seq.logprobs is None:
                seq.logprobs, seq.cumulative_logprob = [], 0.0
            seq.logprobs.append(self._logprob_entry(sampler_output.logprobs, row, params.logprobs,
                                                    params.detokenize))
            seq.cumulative_logprob += sampler_output.logprobs.logprobs[row]
        new_text = ""
        if params.detokenize:
            if seq.decoder is None:
                seq.decoder = self.tokenizer.decode_stream(params.skip_special_tokens)
            new_text = seq.decoder.step(token)
            seq.text += new_text
        self.stop_checker.check(seq, len(new_text))
        if seq.grammar is not None and not seq.is_finished and seq.grammar.is_terminated():
            seq.finish("stop")  # the constraint is complete (its stop token taken), ignore_eos or not

    def _logprob_entry(self, logprobs: BatchLogprobs, row: int, k: int, detokenize: bool) -> TokenLogprobs:
        """{token id: Logprob} for the chosen token of `row` and its k most likely alternatives."""
        token = logprobs.token_ids[row]
        entry = {token: Logprob(logprobs.logprobs[row], logprobs.ranks[row])}
        for rank, (top_id, value) in enumerate(zip(logprobs.top_ids[row][:k], logprobs.top_logprobs[row][:k]), 1):
            entry.setdefault(top_id, Logprob(value, rank))
        if detokenize:
            for token_id, logprob in entry.items():
                logprob.decoded_token = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return entry


def constraint_dead_end(seq: Sequence) -> str:
    """Why a constrained sequence got a token its constraint refuses: nothing was left to sample."""
    generated = seq.num_output_tokens
    if generated < seq.params.min_tokens and seq.grammar.is_completed():  # its end-of-sequence token was banned
        return (f"structured_outputs: the constraint is complete after {generated} tokens, but min_tokens="
                f"{seq.params.min_tokens} bans the end-of-sequence token it ends with")
    return (f"structured_outputs: the constraint allows no token after {generated} generated tokens (the "
            "model's vocabulary cannot continue it)")


def request_output(group: SequenceGroup) -> RequestOutput | None:
    kind = group.request.params.output_kind
    finished = group.is_finished
    if kind is RequestOutputKind.FINAL_ONLY and not finished:
        return None
    delta = kind is RequestOutputKind.DELTA
    first = group.sequences[0]
    # prompt logprobs go out once: with the first output (for deltas) or with every output (otherwise)
    prompt_logprobs = None if delta and first.num_emitted_tokens > 0 else first.prompt_logprobs
    # streamed, a completion that finished in an earlier output is not sent again (n > 1: the others go on)
    completions = [completion_output(seq, delta) for seq in group.sequences if not (delta and seq.finish_emitted)]
    return RequestOutput(group.request.request_id, group.request.prompt, group.prompt_token_ids, completions,
                         finished, None, False, prompt_logprobs, group.num_cached_tokens)


def completion_output(seq: Sequence, delta: bool) -> CompletionOutput:
    """Made every step for every streamed request (a delta): kept to slices of what is new."""
    first_token, first_char = (seq.num_emitted_tokens, seq.num_emitted_chars) if delta else (0, 0)
    visible = visible_text_length(seq)
    num_tokens = len(seq.token_ids) - seq.num_prompt_tokens
    token_ids = seq.token_ids[seq.num_prompt_tokens + first_token:]
    logprobs = seq.logprobs[first_token:] if seq.logprobs is not None else None
    seq.num_emitted_tokens, seq.num_emitted_chars, seq.finish_emitted = num_tokens, visible, seq.is_finished
    return CompletionOutput(seq.index, seq.text[first_char:visible], token_ids, seq.cumulative_logprob, logprobs,
                            seq.finish_reason, seq.stop_reason)
