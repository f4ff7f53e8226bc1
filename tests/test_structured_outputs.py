"""Structured outputs (SamplingParams.structured_outputs) on SmolLM2: what comes out follows the constraint,
greedy decoding under it is transformers' argmax over the same mask, and a constraint that cannot be compiled
fails its request alone."""
import json
import re
import time
from concurrent.futures import Future

import jsonschema
import pytest
import torch
import xgrammar

from tests.conftest import assert_all_blocks_free, run_to_completion
from wde import LLM, SamplingParams
from wde.core.request import Request
from wde.core.sampling.sampling_params import StructuredOutputsParams
from wde.workflows.decoding.structured_outputs import choice_grammar

SCHEMAS = {
    "nested object": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "array of enums": {"type": "object", "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}},
        "required": ["colors"], "additionalProperties": False},
    "bounded numbers": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["age", "score"], "additionalProperties": False},
    "patterned string": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                                          "ok": {"type": "boolean"}},
                         "required": ["code", "ok"], "additionalProperties": False},
}
MESSAGES = [{"role": "user", "content": "Answer with a JSON object describing a person."}]


@pytest.fixture(scope="module")
def llm():
    return LLM(num_kv_blocks=96, max_num_seqs=8)


def constrained(max_tokens: int = 80, **spec) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=spec)


def test_every_json_output_parses_and_validates(llm):
    prompts = [MESSAGES] * len(SCHEMAS) + [MESSAGES]
    params = [constrained(json=schema) for schema in SCHEMAS.values()] + [constrained(300, json_object=True)]
    params[0] = constrained(json=json.dumps(SCHEMAS["nested object"]))  # the schema as JSON text too
    outputs = llm.chat(prompts, params, use_tqdm=False)
    for (name, schema), output in zip(SCHEMAS.items(), outputs):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", f"{name}: {completion.text!r}"
        jsonschema.validate(json.loads(completion.text), schema)
    assert outputs[-1].outputs[0].finish_reason == "stop"
    assert isinstance(json.loads(outputs[-1].outputs[0].text), dict)
    assert_all_blocks_free(llm.engine)


def test_regex_choice_and_grammar_outputs_match(llm):
    params = [constrained(regex=r"[0-9]{3}-[0-9]{4}"), constrained(choice=["yes", "no", 'it "depends"']),
              constrained(grammar='root ::= "a" ("b" | "c"){2,4} "!"'), constrained(grammar='start: "x" "y" "z"?')]
    texts = [o.outputs[0].text for o in llm.generate(["Phone number:", "Is it raining?", "Say:", "Go:"], params,
                                                     use_tqdm=False)]
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", texts[0])
    assert texts[1] in ("yes", "no", 'it "depends"')
    assert re.fullmatch(r"a[bc]{2,4}!", texts[2])
    assert re.fullmatch(r"xyz?", texts[3])


def test_every_completion_and_async_steps_follow_the_constraint():
    choices = ["red", "green", "blue", "dark purple"]
    spec = {"choice": choices}
    for async_scheduling in (False, True):
        llm = LLM(num_kv_blocks=64, async_scheduling=async_scheduling, max_num_batched_tokens=16)  # chunked prompts
        sampled = llm.generate(["My favourite colour is"] * 2, SamplingParams(
            temperature=1.5, n=4, seed=3, max_tokens=10, structured_outputs=spec), use_tqdm=False)
        assert all(c.text in choices and c.finish_reason == "stop" for o in sampled for c in o.outputs)
        greedy = llm.generate(["Reply with a phone number:"], constrained(regex=r"\(\d{3}\) \d{3}"),
                              use_tqdm=False)[0].outputs[0]
        assert re.fullmatch(r"\(\d{3}\) \d{3}", greedy.text)
        if async_scheduling:
            assert greedy.token_ids == synchronous_ids
        synchronous_ids = greedy.token_ids
        assert_all_blocks_free(llm.engine)


def test_a_constrained_step_launches_before_the_last_outputs_and_masks_after_them(monkeypatch):
    """Async scheduling: step k+1 is launched while step k runs; k's tokens reach the matchers (k's outputs),
    then k+1's masks are filled (in the background, while the host builds step k+2), and k+2's launch queues
    k+1's sampling first; a step never waits for the one before."""
    from wde.workflows.decoding.structured_outputs import XGrammarMask
    llm = LLM(num_kv_blocks=96, max_num_seqs=8, async_scheduling=True)
    stepper, events = llm.engine.stepper, []

    def logged(name, call):
        return lambda *args: events.append(name) or call(*args)
    monkeypatch.setattr(stepper.executor, "launch", logged("launch", stepper.executor.launch))
    monkeypatch.setattr(stepper, "output_processor", logged("outputs", stepper.output_processor))
    monkeypatch.setattr(XGrammarMask, "prepare", lambda mask, logits, prepare=XGrammarMask.prepare:
                        (mask.filled is None and events.append("prepare")) or prepare(mask, logits))
    monkeypatch.setattr(XGrammarMask, "apply", lambda mask, logits, apply=XGrammarMask.apply:
                        events.append("apply") or apply(mask, logits))
    spec = {"json": SCHEMAS["bounded numbers"]}
    overlapped = llm.generate(["A JSON object:"] * 3, constrained(40, **spec), use_tqdm=False)
    steps = events.count("launch")
    assert steps >= 10 and events[:2] == ["launch", "prepare"]  # nothing in flight: its masks at once
    # from then on, each step: launched (queuing the sampling of the one before), the outputs of the one before,
    # then its masks
    assert "".join(name[0] for name in events[2:]).startswith("laop" * (steps - 2))
    sync = LLM(num_kv_blocks=96, max_num_seqs=8, async_scheduling=False)
    expected = sync.generate(["A JSON object:"] * 3, constrained(40, **spec), use_tqdm=False)
    sync.close()
    assert [o.outputs[0].token_ids for o in overlapped] == [o.outputs[0].token_ids for o in expected]
    assert_all_blocks_free(llm.engine)
    llm.close()


def test_greedy_constrained_ids_are_transformers_masked_argmax(llm, hf_smollm2):
    model, tokenizer = hf_smollm2
    schema = SCHEMAS["bounded numbers"]
    prompt = "A JSON object with an age and a score:"
    ours = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0,
                                                 structured_outputs={"json": schema}), use_tqdm=False)[0].outputs[0]
    vocab_size = llm.engine.config.model.vocab_size
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                   stop_token_ids=[tokenizer.eos_token_id])
    matcher = xgrammar.GrammarMatcher(xgrammar.GrammarCompiler(info).compile_json_schema(schema))
    ids = tokenizer(prompt).input_ids
    expected = []
    for _ in range(10):
        with torch.no_grad():
            logits = model(torch.tensor([ids + expected])).logits[0, -1:].float()
        bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        matcher.fill_next_token_bitmask(bitmask)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size)
        expected.append(int(logits.argmax()))
        assert matcher.accept_token(expected[-1])
    assert ours.token_ids == expected
    # the log-probabilities reported are the model's own, from before the mask
    with torch.no_grad():
        raw = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
    assert abs(ours.logprobs[0][expected[0]].logprob - float(raw[expected[0]])) < 1e-3


def test_a_constraint_that_cannot_compile_fails_alone(llm):
    params = [constrained(regex="(unclosed"), constrained(json='{"type": "object", "properties": 7}'),
              constrained(grammar="root ::= undefined_rule"), SamplingParams(temperature=0, max_tokens=6),
              constrained(choice=["ok"])]
    outputs = llm.generate(["a", "b", "c", "d", "e"], params, use_tqdm=False)
    assert "structured_outputs.regex could not be compiled" in outputs[0].error
    assert "parenthesis" in outputs[0].error and not outputs[0].error.startswith("[")
    assert "structured_outputs.json could not be compiled" in outputs[1].error
    assert "structured_outputs.grammar could not be compiled" in outputs[2].error
    assert outputs[3].error is None and len(outputs[3].outputs[0].token_ids) == 6
    assert outputs[4].error is None and outputs[4].outputs[0].text == "ok"
    assert_all_blocks_free(llm.engine)


@pytest.mark.parametrize("spec,message", [({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"),
                                          ({"choice": []}, "at least 1"), ({"regex": ""}, "at least 1"),
                                          ({"json_schema_typo": {}}, "Extra inputs"),
                                          ({"regex": "\ud800"}, "structured_outputs.regex"),
                                          ({"regex": "a" * 40000}, "at most 32768"),
                                          ({"choice": ["x"] * 2000}, "at most 1024"),
                                          ({"json": "[" * 20000}, "nests more than 32 deep"),
                                          ({"json": "{bad"}, "not valid JSON"),
                                          ({"json": "5"}, "must be a JSON schema, an object; it is 5"),
                                          ({"json": "[]"}, "must be a JSON schema, an object"),
                                          ({"choice": ["ok", "\ud800"]}, r"choice\[1\] is not unicode text")])
def test_bad_structured_outputs_are_refused_when_made(spec, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(structured_outputs=spec)


def test_choices_become_a_grammar_of_exactly_those_strings():
    assert choice_grammar(["a", 'say "hi"', "é\n"]) == 'root ::= "a" | "say \\"hi\\"" | "é\\n"'
    assert StructuredOutputsParams(json={"type": "object"}).kind == "json"


def test_a_request_whose_grammar_compiles_waits_and_the_next_goes_first(llm):
    engine = llm.engine
    compiling, spec = Future(), StructuredOutputsParams(choice=["x"])
    engine.scheduler.add_request(Request("slow", None, [5, 6, 7], SamplingParams(
        temperature=0, max_tokens=5, structured_outputs=spec), 0.0, grammar=compiling))
    engine.scheduler.add_request(Request("fast", None, [5, 6], SamplingParams(max_tokens=2), 0.0))
    finished = {}
    while "fast" not in finished:
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.scheduler.new_requests[0].request_id == "slow"  # still waiting for its grammar
    compiling.set_result(engine.structured_outputs.compile(spec).result())
    finished.update(run_to_completion(engine))
    assert finished["slow"].outputs[0].text == "x"


def test_an_aborted_request_leaves_the_grammar_it_shares_to_the_others(llm):
    """Requests with the same constraint share one compilation: aborting one (a client gone) must not cancel
    it under the others."""
    engine = llm.engine
    compiling, spec = Future(), StructuredOutputsParams(choice=["teal", "ochre"])
    for request_id in ("gone", "stays"):
        engine.scheduler.add_request(Request(request_id, None, [5, 6, 7], SamplingParams(
            temperature=0, max_tokens=5, structured_outputs=spec), 0.0, grammar=compiling))
    engine.abort_request("gone")
    assert not compiling.cancelled()
    compiling.set_result(engine.structured_outputs.compile(spec).result())
    finished = run_to_completion(engine)
    assert finished["stays"].outputs[0].text in ("teal", "ochre") and "gone" not in finished


def test_constrained_tokens_are_the_same_over_two_ranks_and_through_preemption(tiny_model_dir):
    """A word-level vocabulary ("w10" is one token): the constraint is over the tokens' concatenated text."""
    folder = tiny_model_dir("qwen3")
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    choice = {"choice": ["w10w11w12", "w13", "w14w15"]}
    params = [SamplingParams(temperature=0, max_tokens=8, structured_outputs=choice),
              SamplingParams(temperature=0, max_tokens=8, structured_outputs={"regex": "(w1[0-9]){3}"}),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)]

    def token_ids(**args) -> list[list[int]]:
        llm = LLM(model=folder, **args)
        try:
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.close()
    alone = token_ids(num_kv_blocks=48)
    vocab = {f"w{i}": i for i in range(512)}  # the tiny models' word-level ids (tests/tiny_models.py)
    allowed = [[[vocab["w10"], vocab["w11"], vocab["w12"]], [vocab["w13"]], [vocab["w14"], vocab["w15"]]]]
    assert alone[0][:-1] in allowed[0]  # the choice, then the end-of-sequence token
    assert len(alone[1]) == 4 and all(vocab["w10"] <= t <= vocab["w19"] for t in alone[1][:3])
    assert token_ids(num_kv_blocks=48, tensor_parallel_size=2) == alone
    # 3 blocks of 4 tokens for 3 sequences of up to 12: the scheduler preempts and recomputes
    assert token_ids(num_kv_blocks=3, block_size=4, max_num_seqs=3) == alone


def write_byte_level_tokenizer_with_a_split_character(folder: str) -> dict[str, int]:
    """Over a tiny model's folder: a byte-level tokenizer of the 256 bytes, <unk> (0), </s> (1, the tiny
    models' end-of-sequence id) and "-" followed by the first of the 3 bytes of a UTF-8 character (0xE0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "</s>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    vocab["-\u00e0"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, [("-", "\u00e0")], unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    return vocab


def test_a_token_the_mask_allows_and_the_matcher_refuses_gives_way_to_a_runner_up(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    """xgrammar 0.2.9's mask after "[" of an integer array lets "-\xe0" through, which its matcher refuses: the
    row's next token by its own sampling takes its place, and no request fails. With async scheduling the next
    step was launched with the refused token as its input: that row is rewound and computed again."""
    import shutil
    from wde.core.sampling.sampler import SamplerOutput
    folder = shutil.copytree(tiny_model_dir("qwen3"), tmp_path / "byte-level")
    vocab = write_byte_level_tokenizer_with_a_split_character(str(folder))
    schema = {"type": "array", "items": {"type": "integer"}}
    # the CPU's draws (seeded) reach the bad token
    llm = LLM(model=str(folder), num_kv_blocks=64, device="cpu", async_scheduling=True)
    matcher = llm.engine.structured_outputs.new_matcher(
        llm.engine.structured_outputs.compile(StructuredOutputsParams(json=schema)).result(), [5, 6, 7])
    assert matcher.accept_token(vocab["["])
    logits = torch.zeros(1, llm.engine.config.model.vocab_size)
    llm.engine.structured_outputs.token_mask([0], [matcher]).apply(logits)
    assert logits[0, vocab["-\u00e0"]] == 0 and not matcher.accept_token(vocab["-\u00e0"])  # xgrammar's bug
    replaced, rewound = [], []
    take_runner_up = SamplerOutput.take_runner_up
    monkeypatch.setattr(SamplerOutput, "take_runner_up",
                        lambda self, row, accepts: replaced.append(take_runner_up(self, row, accepts)) or replaced[-1])
    rewind = llm.engine.scheduler.rewind
    monkeypatch.setattr(llm.engine.scheduler, "rewind", lambda item: rewound.append(item.start) or rewind(item))
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=16, structured_outputs={"json": schema})
              for seed in range(48)]
    outputs = llm.generate([[5, 6, 7]] * len(params), params, use_tqdm=False)
    assert replaced and all(replaced), replaced
    assert len(rewound) == len(replaced)  # each replaced token was the input of a step already launched
    for output in outputs:
        assert output.error is None
        check = xgrammar.GrammarMatcher(llm.engine.structured_outputs.compile(StructuredOutputsParams(json=schema))
                                        .result())
        assert all(check.accept_token(token) for token in output.outputs[0].token_ids)
        assert vocab["-\u00e0"] not in output.outputs[0].token_ids
    assert_all_blocks_free(llm.engine)
    llm.close()
    sync = LLM(model=str(folder), num_kv_blocks=64, device="cpu", async_scheduling=False)
    expected = sync.generate([[5, 6, 7]] * len(params), params, use_tqdm=False)
    sync.close()
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]


def test_a_compilation_past_its_time_fails_its_request_and_the_others_go_on(monkeypatch):
    from wde.workflows.decoding import structured_outputs
    monkeypatch.setattr(structured_outputs, "COMPILE_TIMEOUT_S", 1.0)
    llm = LLM(num_kv_blocks=32)
    slow = constrained(regex="(a|b)*" * 200)  # ~6 s here: its compile time grows as the cube of its length
    outputs = llm.generate(["x", "y", "z"], [slow, constrained(choice=["ok"]), slow], use_tqdm=False)
    assert "took longer than 1 s" in outputs[0].error and "took longer than 1 s" in outputs[2].error
    assert outputs[1].error is None and outputs[1].outputs[0].text == "ok"
    assert llm.generate(["w"], constrained(choice=["yes"]), use_tqdm=False)[0].outputs[0].text == "yes"  # restarted


@pytest.mark.parametrize("schema,where", [
    ({"type": "array", "items": {"enum": [1, 2]}, "uniqueItems": True}, "/: uniqueItems"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "/: allOf"),
    ({"type": "object", "properties": {"a": {"type": "number", "multipleOf": 3}}}, "/properties/a: multipleOf"),
    ({"$ref": "http://example.com/x.json"}, "$ref 'http://example.com/x.json'"),
    # what xgrammar takes but does not hold the output to in these combinations (each came out invalid)
    ({"type": "object", "properties": {"a": {"anyOf": []}}}, "/properties/a: anyOf with no schemas"),
    ({"type": "object", "required": ["a"]}, "/: required names ['a'], which properties does not define"),
    ({"type": "integer", "enum": [1, 50, 100], "maximum": 10}, "/: enum / const beside ['maximum']"),
    ({"type": "string", "enum": ["a", "b"], "const": "c"}, "/: enum / const beside ['each other']"),
    ({"type": "integer", "const": "x"}, "/: enum / const values that are not of type integer"),
    ({"type": "string", "minLength": 3, "pattern": "^a?$"}, "/: pattern beside minLength / maxLength"),
    ({"type": "string", "pattern": "^(?!a)[a-c]$"}, "/: pattern with lookaround"),
    ({"type": "string", "pattern": "a^b"}, "/: pattern with an anchor inside the pattern ('^' at 1)"),
    ({"type": "object", "properties": {"x": {"type": "number", "minimum": 1e-10, "maximum": 1e-9}}},
     "/properties/x: a number range with no value of 6 decimals or fewer"),
    ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.000001}, "/: a number range with no value"),
    ({"type": "object", "properties": {"a": {"type": []}}}, "/properties/a: type with no types"),
    ({"type": "string", "pattern": "^[\\x00-\\x1f]+$"}, "/: pattern with control characters")])
def test_a_schema_keyword_decoding_would_not_enforce_is_refused(llm, schema, where):
    with pytest.raises(ValueError, match=re.escape(where)):
        llm.generate(["x"], constrained(json=schema), use_tqdm=False)


@pytest.mark.parametrize("regex", ["a$b", "x(y^z)", "(?=a)a"])
def test_a_regex_xgrammar_would_not_hold_the_output_to_is_refused(llm, regex):
    with pytest.raises(ValueError, match="structured_outputs.regex has what decoding cannot hold"):
        llm.generate(["x"], constrained(regex=regex), use_tqdm=False)


def test_anchors_at_the_ends_of_patterns_groups_and_alternatives_stay_allowed(llm):
    params = [constrained(regex="(^ab|^cd)$"), constrained(regex="^[$^]x$"),
              constrained(json={"type": "string", "pattern": "^(?:[0-9]{2}|z\\$)$"})]
    texts = [o.outputs[0].text for o in llm.generate(["a", "b", "c"], params, use_tqdm=False)]
    assert texts[0] in ("ab", "cd") and texts[1] in ("$x", "^x")
    assert re.fullmatch(r"[0-9]{2}|z\$", json.loads(texts[2]))


def test_keyword_names_as_property_names_lark_with_ebnf_text_and_special_tokens_as_text(llm):
    schema = {"type": "object", "properties": {"allOf": {"enum": ["x"]}}, "required": ["allOf"],
              "additionalProperties": False}
    params = [constrained(json=schema), constrained(grammar='start: "a::=b"'),
              constrained(choice=["<|im_end|>", "<|im_start|>"])]
    json_text, lark, special = [o.outputs[0] for o in llm.generate(["x", "y", "z"], params, use_tqdm=False)]
    assert json.loads(json_text.text) == {"allOf": "x"}
    assert lark.text == "a::=b"
    # the text of a special token, written with ordinary tokens: never the special token itself
    assert special.text in ("<|im_end|>", "<|im_start|>")
    assert not set(special.token_ids[:-1]) & set(llm.engine.tokenizer.hf.all_special_ids)


def test_min_tokens_past_a_complete_constraint_is_named(llm):
    output = llm.generate(["x"], SamplingParams(temperature=0, min_tokens=10, max_tokens=20,
                                                structured_outputs={"choice": ["yes"]}), use_tqdm=False)[0]
    assert "min_tokens=10 bans the end-of-sequence token" in output.error


def test_an_engine_waiting_only_for_a_grammar_does_not_spin(llm):
    engine = llm.engine
    compiling = Future()
    engine.scheduler.add_request(Request("waits", None, [5, 6], SamplingParams(
        max_tokens=2, structured_outputs={"choice": ["x"]}), 0.0, grammar=compiling))
    start = time.monotonic()
    for _ in range(10):
        assert engine.step() == []
    assert time.monotonic() - start >= 10 * 0.04  # each idle step waited for the grammar, not returned at once
    engine.abort_request("waits")
    assert not engine.has_unfinished_requests() and not compiling.cancelled()  # others may share the grammar
