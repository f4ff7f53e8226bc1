"""What the fuzz tests draw from: anything a client could send, and how many cases they try.

Two hypothesis profiles: "ci" (the default: a bounded number of cases, so the suite stays within CI's time)
and "long" (WDE_FUZZ=long python -m pytest tests/test_fuzz_*.py: fifty times as many). Each fuzz test counts
the cases it ran; the session's summary prints the counts.
"""
import os
from collections import Counter

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

PROFILE = os.environ.get("WDE_FUZZ", "ci")
SCALE = {"ci": 1, "long": 50}[PROFILE]  # a test's cases: its CI count times this
# engines are built once per module and shared by the cases; a case runs a whole engine, so it is slow
# no "explain" phase: on a failure it re-runs the case hundreds of times (minutes of engine work)
settings.register_profile("wde-fuzz", deadline=None, print_blob=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                 HealthCheck.data_too_large])
cases_tried: Counter = Counter()  # test name -> cases run (printed in the session summary)


class Shared:
    """What a module's cases share (an engine, expected results), with a short repr: hypothesis prints the
    fixtures of a failing case."""

    def __init__(self, **parts):
        self.__dict__.update(parts)

    def __repr__(self) -> str:
        return f"Shared({', '.join(self.__dict__)})"


def fuzz_settings(ci_examples: int) -> settings:
    return settings(settings.get_profile("wde-fuzz"), max_examples=ci_examples * SCALE)


def count_case(test_name: str) -> None:
    cases_tried[test_name] += 1


# --- values of every kind, weighted toward those that break arithmetic, conversions and tokenizers --------

# hypothesis leaves lone surrogates out of text unless asked: they are what broke the tokenizer
any_char = st.one_of(st.characters(), st.characters(), st.characters(), st.characters(categories=["Cs"]))
any_text = st.text(any_char, max_size=30)
EDGE_INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1, 2**70,
             -2**70, 10**30]
EDGE_FLOATS = [0.0, -0.0, 5e-324, 1e-310, 1e-40, 1e-6, 1e-5, 0.5, 1.0, 2.0, 100.0, 3.4e38, 1e39, 1e308,
               float("nan"), float("inf"), float("-inf")]
any_int = st.one_of(st.integers(-3, 8), st.integers(), st.sampled_from(EDGE_INTS))
any_float = st.one_of(st.floats(), st.floats(-3, 3), st.sampled_from(EDGE_FLOATS))
scalar = st.one_of(st.none(), st.booleans(), any_int, any_float, any_text)
any_value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(any_text, inner, max_size=3)),
                         max_leaves=8)


# JSON schemas, good and bad: xgrammar compiles them, or the request fails with its message
JSON_SCHEMAS = st.recursive(
    st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "number", "boolean", "null", "object",
                                                    "array", "nonsense"])},
                          optional={"maxLength": any_int, "minimum": any_int, "enum": st.lists(scalar, max_size=3),
                                    "pattern": any_text}),
    lambda inner: st.one_of(st.fixed_dictionaries({"type": st.just("object"),
                                                   "properties": st.dictionaries(any_text, inner, max_size=3)},
                                                  optional={"required": st.lists(any_text, max_size=2)}),
                            st.fixed_dictionaries({"type": st.just("array"), "items": inner}),
                            st.dictionaries(any_text, any_value, max_size=2)),
    max_leaves=6)


def mostly(common: st.SearchStrategy, rare: st.SearchStrategy, odds: int = 4) -> st.SearchStrategy:
    """`common`, and `rare` about one time in odds + 1: a case whose every field is wild is refused at once
    and reaches nothing past input validation."""
    return st.integers(0, odds).flatmap(lambda i: rare if i == odds else common)


def prompts(vocab_size: int, max_model_len: int) -> st.SearchStrategy:
    """Prompts as the engine takes them (text, token ids, vLLM's dicts), good and bad, short and too long."""
    ids = st.lists(st.integers(0, vocab_size - 1), min_size=1, max_size=24)
    words = st.lists(st.integers(2, 40), min_size=1, max_size=12).map(lambda w: " ".join(f"w{i}" for i in w))
    takeable = st.one_of(
        words, ids, any_text, st.fixed_dictionaries({"prompt": words}),
        st.fixed_dictionaries({"prompt_token_ids": ids}),
        st.integers(max_model_len - 3, max_model_len + 3).map(lambda n: [5] * n),  # around the length limit
        st.integers(0, 2 * max_model_len).map(lambda n: "w5 " * n))
    wild = st.one_of(
        st.just(""), st.just([]), st.lists(st.integers(-2, vocab_size + 2), max_size=5),
        st.lists(any_int, max_size=4), st.lists(scalar, min_size=1, max_size=3),
        st.dictionaries(st.sampled_from(["prompt", "prompt_token_ids", "text"]), st.one_of(words, ids), max_size=2),
        st.tuples(words, words), any_value)
    return mostly(takeable, wild, odds=3)


def with_plausible(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly values a field takes (so requests get past validation and exercise the engine), else anything."""
    return mostly(plausible, any_value, odds=40)


def sampling_fields(vocab_size: int) -> dict[str, st.SearchStrategy]:
    """Per SamplingParams field: plausible values (small, to keep cases short) and edge values."""
    token = st.integers(0, vocab_size - 1)
    return {
        "n": with_plausible(st.integers(1, 3)),
        "temperature": with_plausible(mostly(st.one_of(st.just(0.0), st.floats(0, 2)), st.sampled_from(EDGE_FLOATS))),
        "top_p": with_plausible(st.one_of(st.floats(0, 1), st.sampled_from([5e-324, 1e-310, 1e-40, 1.0]))),
        "top_k": with_plausible(st.one_of(st.integers(-1, 8), st.sampled_from([vocab_size, 2**31 - 1, 2**31]))),
        "min_p": with_plausible(st.floats(0, 1)),
        "presence_penalty": with_plausible(st.floats(-2, 2)),
        "frequency_penalty": with_plausible(st.floats(-2, 2)),
        "repetition_penalty": with_plausible(st.one_of(st.floats(0.001, 1000), st.sampled_from([1e-3, 1e3]))),
        "seed": with_plausible(mostly(st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)),
                                      st.sampled_from(EDGE_INTS))),
        "stop": with_plausible(st.one_of(st.none(), any_text, st.lists(any_text, max_size=3))),
        "stop_token_ids": with_plausible(st.lists(mostly(token, any_int), max_size=3)),
        "include_stop_str_in_output": with_plausible(st.booleans()),
        "ignore_eos": with_plausible(st.booleans()),
        "max_tokens": with_plausible(mostly(st.one_of(st.none(), st.integers(1, 12)), st.sampled_from(EDGE_INTS))),
        "min_tokens": with_plausible(mostly(st.integers(0, 6), st.sampled_from(EDGE_INTS))),
        "logprobs": with_plausible(st.one_of(st.none(), st.integers(0, 20))),
        "prompt_logprobs": with_plausible(st.one_of(st.none(), st.integers(0, 20))),
        "skip_special_tokens": with_plausible(st.booleans()),
        "detokenize": with_plausible(st.booleans()),
        "output_kind": with_plausible(st.sampled_from(["cumulative", "delta", "final_only"])),
        "structured_outputs": with_plausible(st.one_of(
            st.none(), st.fixed_dictionaries({}, optional={"regex": any_text, "choice": st.lists(any_text, max_size=3),
                                                           "grammar": any_text, "json_object": st.booleans(),
                                                           "json": st.one_of(any_text, JSON_SCHEMAS)}),
            st.sampled_from([{"regex": "w1[0-9] w2"}, {"choice": ["w10", "w11 w12"]}, {"json_object": True},
                             {"grammar": 'root ::= "w1" [0-9]'}]))),
    }


POOLING_FIELDS = {
    "normalize": with_plausible(st.one_of(st.none(), st.booleans())),
    "dimensions": with_plausible(mostly(st.one_of(st.none(), st.integers(1, 400)), st.sampled_from(EDGE_INTS))),
    "activation": with_plausible(st.booleans()),
    "truncate_prompt_tokens": with_plausible(mostly(st.one_of(st.none(), st.integers(-2, 40)),
                                                    st.sampled_from(EDGE_INTS))),
}


def params(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """A params dict of some of the fields (sometimes with a field that does not exist), or no params, or
    something that is not params at all."""
    some_fields = st.fixed_dictionaries({}, optional=fields)
    return mostly(st.one_of(some_fields, st.none()),
                  st.one_of(any_value, st.fixed_dictionaries({"no_such_field": any_value}, optional=fields)), odds=8)
