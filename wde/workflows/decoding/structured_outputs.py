"""Structured outputs through xgrammar: JSON schemas, any JSON object, regexes, grammars and choices.

xgrammar rather than llguidance or outlines-core: it is what vLLM and SGLang default to, it compiles a JSON
schema, a regex, EBNF and Lark, and its masks come out as the packed bitmask its own kernel applies to a batch
of logits at once (one op for all the constrained rows, on the GPU or the CPU). A compiled grammar is shared by
every request with the same constraint (the last CACHED_GRAMMARS kept); each sequence keeps its own matcher.
Compilation starts when the request is added, in a compiler process (grammar_compiler.py: one that runs past
COMPILE_TIMEOUT_S is ended), so no step waits for it: the scheduler admits the request once its grammar is ready.
"""
import json
import logging
import os
import queue
import re
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import ROUND_CEILING, Decimal

import torch

from wde.core import interfaces
from wde.core.pinned_copy import PinnedRing
from wde.core.sampling.sampling_params import StructuredOutputsParams
from wde.workflows.decoding.after_reasoning import AfterReasoning, ReasoningTokens
from wde.workflows.decoding.grammar_compiler import CompilerProcess
from wde.workflows.decoding.regex_checks import unenforced_regex
from wde.workflows.decoding.stop_checker import eos_token_ids

logger = logging.getLogger(__name__)
CACHED_GRAMMARS = 256
COMPILER_PROCESSES = 2  # constraints compiled at once, each in a process of its own (grammar_compiler.py)
COMPILE_TIMEOUT_S = 10.0  # a compilation's time: past it, its process is ended and its request fails
# xgrammar's threads that fill a step's masks (256 rows of W1's JSON schema on an H200's host: 2.1 ms on 1 thread,
# 1.0 ms on 4 or 8, 2.0 ms on 16)
FILL_THREADS = min(8, os.cpu_count() or 1)
# what xgrammar puts before its messages: "[01:58:03] /project/cpp/file.cc:94: ", "Check failed: (...) is false: "
XGRAMMAR_PREFIXES = re.compile(r"^(\[[\d:]+\] \S+:\d+: )?(Check failed: \(.*?\) is false: )?")
EBNF_RULE = re.compile(r"^\s*[A-Za-z_][\w-]*\s*::=", re.MULTILINE)  # `root ::= ...`; Lark writes `start: ...`
# JSON schema keywords xgrammar does not hold the output to (it compiles the schema as if they were absent):
# refused, so that what comes out always validates against the schema as the client wrote it
UNENFORCED_KEYWORDS = frozenset({
    "allOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "uniqueItems", "contains",
    "minContains", "maxContains", "patternProperties", "propertyNames", "minProperties", "maxProperties",
    "multipleOf", "unevaluatedProperties", "unevaluatedItems"})
NAMED_SCHEMAS = frozenset({"properties", "$defs", "definitions"})
DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "description", "title"})  # values, not schemas
# what may stand beside enum / const: xgrammar writes one of the values and checks nothing else of the schema
BESIDE_VALUES = frozenset({"enum", "const", "type", "default", "examples", "description", "title", "$comment"})
NUMBER_DECIMALS = 6  # the decimals xgrammar writes a bounded number with (its grammar's limit)
JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "null": (type(None),),
              "array": (list,), "object": (dict,)}


def of_type(value, types) -> bool:
    """Whether a JSON value is of one of the schema `type`s (a bool is no integer or number in JSON)."""
    names = types if isinstance(types, list) else [types]
    return any(isinstance(value, JSON_TYPES.get(name, ())) and not (isinstance(value, bool) and name != "boolean")
               for name in names)


def without_short_numbers(node: dict) -> bool:
    """Whether a "number" schema's range holds no value of NUMBER_DECIMALS decimals or fewer: xgrammar's grammar
    for such a range (minimum 1e-10, maximum 1e-9) takes the empty string, so out comes no value at all."""
    types = node.get("type")
    bounds = [node.get(key) for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")]
    if "number" not in (types if isinstance(types, list) else [types]) or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds if b is not None):
        return False
    low, high = bounds[0] if bounds[0] is not None else bounds[1], bounds[2] if bounds[2] is not None else bounds[3]
    if low is None or high is None:
        return False
    step = Decimal(1).scaleb(-NUMBER_DECIMALS)
    first = (Decimal(str(low)) / step).to_integral_value(rounding=ROUND_CEILING) * step  # the least short value
    if bounds[0] is None and first == Decimal(str(low)):
        first += step
    return first > Decimal(str(high)) or (bounds[2] is None and first == Decimal(str(high)))


def unenforced_combination(node: dict) -> str | None:
    """Keywords xgrammar takes but would not hold the output to in this combination, or None: an empty anyOf /
    oneOf (it writes nothing), required names that properties does not define, enum / const beside other
    constraints or of another type, a pattern with lengths or lookaround."""
    for key in ("anyOf", "oneOf", "type"):
        if node.get(key) == []:
            return f"{key} with no schemas" if key != "type" else "type with no types"
    if without_short_numbers(node):
        return f"a number range with no value of {NUMBER_DECIMALS} decimals or fewer"
    required, properties = node.get("required"), node.get("properties")
    if isinstance(required, list):
        undefined = [name for name in required if not (isinstance(properties, dict) and name in properties)]
        if undefined:
            return f"required names {undefined[:3]}, which properties does not define"
    if "enum" in node or "const" in node:
        values = (node["enum"] if isinstance(node.get("enum"), list) else []) + (
            [node["const"]] if "const" in node else [])
        beside = sorted(set(node) - BESIDE_VALUES)
        if beside or ("enum" in node and "const" in node):
            return f"enum / const beside {beside or ['each other']}"
        if "type" in node and not all(of_type(value, node["type"]) for value in values):
            return f"enum / const values that are not of type {node['type']}"
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        if "minLength" in node or "maxLength" in node:
            return "pattern beside minLength / maxLength"
        problem = unenforced_regex(pattern, in_json_string=True)
        if problem is not None:
            return f"pattern with {problem}"
    return None


def unenforced_keyword(schema) -> str | None:
    """Where in `schema` (a JSON schema, already checked to nest at most MAX_SCHEMA_DEPTH deep) a keyword
    xgrammar does not enforce is, or a $ref that is not within the schema: "path: keyword"; None if nowhere."""
    todo = [("", schema)]
    while todo:
        path, node = todo.pop()
        if isinstance(node, list):
            todo += [(f"{path}/{i}", child) for i, child in enumerate(node)]
            continue
        if not isinstance(node, dict):
            continue
        combination = unenforced_combination(node)
        if combination is not None:
            return f"{path or '/'}: {combination}"
        for key, value in node.items():
            if key in UNENFORCED_KEYWORDS:
                return f"{path or '/'}: {key}"
            if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
                return f"{path or '/'}: $ref {value!r} (only references within the schema, '#/...')"
            if key in NAMED_SCHEMAS and isinstance(value, dict):  # name -> schema: the names are no keywords
                todo += [(f"{path}/{key}/{name}", child) for name, child in value.items()]
            elif key not in DATA_KEYWORDS:
                todo.append((f"{path}/{key}", value))
    return None


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose only sentences are the choices: each as a quoted literal (JSON's escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def clean(error: Exception) -> str:
    return XGRAMMAR_PREFIXES.sub("", str(error).strip()).strip()


def stop_all(processes: list[CompilerProcess]) -> None:
    for process in processes:
        process.stop()


def grammar_source(spec: StructuredOutputsParams) -> tuple[str, str]:
    """(how xgrammar compiles it: json, regex, ebnf or lark; its text); ValueError for a JSON schema that uses
    what xgrammar would not enforce."""
    kind = spec.kind
    if kind == "json":
        schema = spec.json_schema
        where = unenforced_keyword(json.loads(schema) if isinstance(schema, str) else schema)
        if where is not None:
            raise ValueError(f"structured_outputs.json uses what decoding cannot hold the output to, at {where}")
        return "json", schema if isinstance(schema, str) else json.dumps(schema)
    if kind == "json_object":
        return "json", '{"type": "object"}'
    if kind == "regex":
        problem = unenforced_regex(spec.regex, in_json_string=False)
        if problem is not None:
            raise ValueError(f"structured_outputs.regex has what decoding cannot hold the output to: {problem}")
        return "regex", spec.regex
    if kind == "choice":
        return "ebnf", choice_grammar(spec.choice)
    return ("ebnf" if EBNF_RULE.search(spec.grammar) else "lark"), spec.grammar


class XGrammarBackend(interfaces.StructuredOutputBackend):
    @classmethod
    def from_engine(cls, engine) -> "XGrammarBackend":
        return cls(engine.config, engine.tokenizer, eos_token_ids(engine.tokenizer, engine.config.model.hf_config))

    def __init__(self, config, tokenizer, eos_ids: frozenset[int]):
        super().__init__(config)
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        parser = config.args.reasoning_parser  # its <think>...</think> goes before the constraint
        self.reasoning = None if parser is None else ReasoningTokens.of(parser, tokenizer.hf.get_vocab())
        self.vocab_size = config.model.vocab_size  # the logits' width, which may exceed the tokenizer's
        # a thread per compiler process waits for it: one long compilation does not hold up the next request's
        self.pool = ThreadPoolExecutor(max_workers=COMPILER_PROCESSES, thread_name_prefix="wde-grammar")
        self._processes: queue.Queue[CompilerProcess] | None = None  # made by the first constrained request
        self._info = None  # the vocabulary as xgrammar reads it (reading it takes a while: then too)
        self._setup_lock = threading.Lock()
        self._batch_matcher = None  # fills a step's masks on several threads; made with the first mask
        self._pinned_bitmasks = PinnedRing()  # the steps' bitmasks on their way to a GPU
        self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wde-masks")  # fills them, in turn
        self._compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()  # the latest, by their source
        self._compiled_lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams) -> Future:
        """The constraint's grammar, compiled once for all the requests that ask for the same (unless that
        compilation failed); ValueError at once for a JSON schema xgrammar would not enforce."""
        source = grammar_source(spec)
        with self._compiled_lock:
            future = self._compiled.get(source)
            if future is None or (future.done() and future.exception() is not None):
                future = self._compiled[source] = self.pool.submit(self._compile, spec.kind, *source)
            self._compiled.move_to_end(source)
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
            return future

    def _compile(self, kind: str, method: str, text: str):
        import xgrammar
        processes = self._compiler_processes()
        process = processes.get()
        try:
            compiled, result = process.compile(method, text, COMPILE_TIMEOUT_S)
        finally:
            processes.put(process)
        if not compiled:
            raise ValueError(f"structured_outputs.{kind} could not be compiled: {clean(result)}")
        return xgrammar.CompiledGrammar.deserialize_json(result, self._info)

    def _compiler_processes(self) -> "queue.Queue[CompilerProcess]":
        with self._setup_lock:
            if self._processes is None:
                start = time.perf_counter()
                self._info = self._tokenizer_info()
                info_json = self._info.serialize_json()
                self._processes = queue.Queue()
                processes = [CompilerProcess(info_json) for _ in range(COMPILER_PROCESSES)]
                for process in processes:
                    self._processes.put(process)
                weakref.finalize(self, stop_all, processes)  # with the engine, not only with its process
                logger.info("structured outputs: xgrammar read the vocabulary (%d tokens) in %.1f s; %d compiler "
                            "processes, %.0f s for each compilation", self.vocab_size, time.perf_counter() - start,
                            COMPILER_PROCESSES, COMPILE_TIMEOUT_S)
            return self._processes

    def _tokenizer_info(self):
        """The vocabulary as xgrammar reads it, special tokens left out. xgrammar takes a token for special only
        when its text is empty, and read SmolLM2's <|im_start|> as the text "<|im_start|>" (a choice of that
        text came out as the special token, which the detokenized text then drops): the special tokens, and
        the ids past the tokenizer's vocabulary, are given to it as empty strings."""
        import xgrammar
        hf, size = self.tokenizer.hf, self.vocab_size
        detected = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=size, stop_token_ids=sorted(self.eos_ids))
        vocab = [""] * size
        for token, index in hf.get_vocab().items():
            if index < size:
                vocab[index] = token
        special = set(hf.all_special_ids) | {i for i, token in hf.added_tokens_decoder.items() if token.special}
        for index in special:
            if index < size:
                vocab[index] = ""
        return xgrammar.TokenizerInfo.from_vocab_and_metadata(vocab, detected.dump_metadata())

    def new_matcher(self, grammar, prompt_token_ids: list[int]) -> interfaces.GrammarMatcher:
        import xgrammar
        matcher = xgrammar.GrammarMatcher(grammar)
        if self.reasoning is None:
            return matcher
        return AfterReasoning(matcher, self.reasoning, self.reasoning.open_in(prompt_token_ids))

    def token_mask(self, rows: list[int], matchers: list) -> "XGrammarMask":
        if self._batch_matcher is None:
            import xgrammar
            self._batch_matcher = xgrammar.BatchGrammarMatcher(max_threads=FILL_THREADS)
        return XGrammarMask(rows, matchers, self.vocab_size, self._batch_matcher, self._pinned_bitmasks,
                            self._filler)


class XGrammarMask:
    """The step's constrained rows: their bitmask is filled on the host once the step's forward pass is queued
    (with async scheduling, once the matchers took the tokens of the step before), by xgrammar's threads, one
    row per matcher, off the engine's thread (xgrammar lets go of the GIL, so the host builds the next step
    meanwhile); then copied over and applied to the logits by xgrammar's kernel, all rows at once."""

    def __init__(self, rows: list[int], matchers: list, vocab_size: int, batch_matcher, pinned: PinnedRing,
                 filler: ThreadPoolExecutor):
        self.rows, self.matchers, self.vocab_size, self.batch_matcher = rows, matchers, vocab_size, batch_matcher
        self.pinned, self.filler = pinned, filler
        self.filled: Future | None = None  # the host bitmask

    def prepare(self, logits: torch.Tensor) -> None:
        if self.filled is None:
            self.filled = self.filler.submit(self._fill, logits.shape[0], logits.is_cuda)

    def apply(self, logits: torch.Tensor) -> None:
        import xgrammar
        # filled here, on this thread, when nobody prepared it: a synchronous step has nothing to overlap it with
        bitmask = self._fill(logits.shape[0], logits.is_cuda) if self.filled is None else self.filled.result()
        on_device = bitmask.to(logits.device, non_blocking=True)
        if logits.is_cuda:
            self.pinned.copied_out()
        xgrammar.apply_token_bitmask_inplace(logits, on_device, vocab_size=self.vocab_size)

    def _fill(self, num_rows: int, pinned: bool) -> torch.Tensor:
        """[rows, words] int32, one bit per token; in pinned memory for a GPU: a copy from pageable memory
        would make the host wait for the forward pass queued before it, which async scheduling overlaps."""
        shape = (num_rows, -(-self.vocab_size // 32))
        size = 4 * shape[0] * shape[1]
        bitmask = (self.pinned.take(size)[:size].view(torch.int32).view(shape) if pinned
                   else torch.empty(shape, dtype=torch.int32))
        live, also_allowed = [], []
        for row, matcher in zip(self.rows, self.matchers):
            matcher, extra = mask_parts(matcher)
            if matcher is not None:
                live.append((row, matcher))
            if extra is not None:
                also_allowed.append((row, extra))
        if len(live) < num_rows:  # the rows without a constraint stay all ones (-1)
            bitmask.fill_(-1)
        if live:
            rows, matchers = zip(*live)
            self.batch_matcher.batch_fill_next_token_bitmask(list(matchers), bitmask, indices=list(rows))
        for row, token in also_allowed:
            word = int(bitmask[row, token // 32]) | 1 << token % 32
            bitmask[row, token // 32] = word - (1 << 32 if word >= 1 << 31 else 0)  # as int32
        return bitmask


def mask_parts(matcher) -> tuple[object | None, int | None]:
    """(the xgrammar matcher that masks a row's next token, or None: every token is allowed; a token allowed
    besides, or None). A matcher that took its stop token (async scheduling: its sequence finished after this
    step was launched, and what the step samples for it is dropped) has no next mask: its row stays open."""
    matcher, extra = matcher.mask_parts() if isinstance(matcher, AfterReasoning) else (matcher, None)
    return (None if matcher is None or matcher.is_terminated() else matcher), extra
