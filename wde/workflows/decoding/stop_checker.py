"""When a sequence stops: end-of-sequence and stop tokens, stop strings, its length budget."""
from transformers import PretrainedConfig

from wde.workflows.decoding.sequence import Sequence


def eos_token_ids(tokenizer, hf_config: PretrainedConfig) -> frozenset[int]:
    """The tokenizer's EOS and every EOS id the model config lists (Llama 3 has several)."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(hf_config, "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return frozenset(i for i in ids if i is not None)


class StopChecker:
    def __init__(self, eos_ids: frozenset[int]):
        self.eos_ids = eos_ids

    def check(self, seq: Sequence, num_new_chars: int) -> None:
        """Finish `seq` if its newest token (and the `num_new_chars` of text it added) ends it."""
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            token = seq.token_ids[-1]
            if token in self.eos_ids and not params.ignore_eos:
                return seq.finish("stop")
            if token in params.stop_token_ids:
                return seq.finish("stop", stop_reason=token)
            if params.stop and self._check_stop_strings(seq, num_new_chars):
                return None
        if seq.num_output_tokens >= seq.max_output_tokens:
            seq.finish("length")

    @staticmethod
    def _check_stop_strings(seq: Sequence, num_new_chars: int) -> bool:
        """Look for a stop string that ends in the new text (it may have started in earlier tokens' text)."""
        params = seq.params
        search_from = max(0, len(seq.text) - num_new_chars - max(map(len, params.stop)) + 1)
        found = [(seq.text.find(stop, search_from), stop) for stop in params.stop]
        found = [(index, stop) for index, stop in found if index != -1]
        if not found:
            return False
        index, stop = min(found)
        seq.text = seq.text[:index + len(stop) if params.include_stop_str_in_output else index]
        seq.finish("stop", stop_reason=stop)
        return True


def visible_text_length(seq: Sequence) -> int:
    """How much of the text may be shown now: while a stop string could still be completing at the end (and
    would then be cut off), its possible beginning is held back."""
    params = seq.params
    if seq.is_finished or not params.stop or params.include_stop_str_in_output:
        return len(seq.text)
    return max(seq.num_emitted_chars, len(seq.text) - max(map(len, params.stop)) + 1)
