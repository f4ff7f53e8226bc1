"""Structured outputs through xgrammar: JSON schemas, any JSON object, regexes, grammars and choices.

xgrammar rather than llguidance or outlines-core: it is what vLLM and SGLang default to, it compiles a JSON
schema, a regex, EBNF and Lark, and its masks come out as the packed bitmask its own kernel applies to a batch
of logits at once (one op for all the constrained rows, on the GPU or the CPU). A compiled grammar is shared by
every request with the same constraint (xgrammar caches them by their text); each sequence keeps its own
matcher. Compilation runs on a thread of its own, started when the request is added, so no step waits for it
(the scheduler admits the request once its grammar is ready).
"""
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from wde.core import interfaces
from wde.core.sampling.sampling_params import StructuredOutputsParams
from wde.workflows.decoding.stop_checker import eos_token_ids

logger = logging.getLogger(__name__)
# xgrammar's threads that fill a step's masks (256 rows of a JSON schema: 1.5 ms on 2 threads here)
FILL_THREADS = min(8, os.cpu_count() or 1)
XGRAMMAR_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[01:58:03] /project/cpp/file.cc:94: " of its errors


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose only sentences are the choices: each as a quoted literal (JSON's escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


class XGrammarBackend(interfaces.StructuredOutputBackend):
    @classmethod
    def from_engine(cls, engine) -> "XGrammarBackend":
        return cls(engine.config, engine.tokenizer, eos_token_ids(engine.tokenizer, engine.config.model.hf_config))

    def __init__(self, config, tokenizer, eos_ids: frozenset[int]):
        super().__init__(config)
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.vocab_size = config.model.vocab_size  # the logits' width, which may exceed the tokenizer's
        # two threads: one long compilation does not hold up the next request's
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="wde-grammar")
        self._compiler = None  # made by the first constrained request: reading the vocabulary takes a while
        self._compiler_lock = threading.Lock()
        self._batch_matcher = None  # fills a step's masks on several threads; made with the first mask

    def compile(self, spec: StructuredOutputsParams) -> Future:
        return self.pool.submit(self._compile, spec)

    def _compile(self, spec: StructuredOutputsParams):
        compiler = self._get_compiler()
        kind = spec.kind
        try:
            if kind == "json":
                return compiler.compile_json_schema(spec.json_schema)
            if kind == "json_object":
                return compiler.compile_json_schema({"type": "object"})
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.choice))
            if "::=" in spec.grammar:
                return compiler.compile_grammar(spec.grammar)
            return compiler.compile_lark(spec.grammar)
        except Exception as e:  # noqa: BLE001 - xgrammar raises several kinds; the request gets the message
            message = XGRAMMAR_LOG_PREFIX.sub("", str(e)).strip()
            raise ValueError(f"structured_outputs.{kind} could not be compiled: {message}") from None

    def _get_compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar
                start = time.perf_counter()
                info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer.hf, vocab_size=self.vocab_size,
                                                               stop_token_ids=sorted(self.eos_ids))
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=2)
                logger.info("structured outputs: xgrammar read the vocabulary (%d tokens) in %.1f s",
                            self.vocab_size, time.perf_counter() - start)
            return self._compiler

    def new_matcher(self, grammar) -> interfaces.GrammarMatcher:
        import xgrammar
        return xgrammar.GrammarMatcher(grammar)

    def token_mask(self, rows: list[int], matchers: list) -> "XGrammarMask":
        if self._batch_matcher is None:
            import xgrammar
            self._batch_matcher = xgrammar.BatchGrammarMatcher(max_threads=FILL_THREADS)
        return XGrammarMask(rows, matchers, self.vocab_size, self._batch_matcher)


class XGrammarMask:
    """The step's constrained rows: their bitmask is filled on the host when the sampler applies it (the
    step's forward pass is queued on the device by then, so the two overlap), by xgrammar's threads, one row per
    matcher, copied over, and applied to the logits by xgrammar's kernel, all rows at once."""

    def __init__(self, rows: list[int], matchers: list, vocab_size: int, batch_matcher):
        self.rows, self.matchers, self.vocab_size, self.batch_matcher = rows, matchers, vocab_size, batch_matcher

    def apply(self, logits: torch.Tensor) -> None:
        import xgrammar
        # one bitmask row per logits row: the rows without a constraint stay all ones (-1)
        bitmask = torch.full((logits.shape[0], -(-self.vocab_size // 32)), -1, dtype=torch.int32)
        self.batch_matcher.batch_fill_next_token_bitmask(self.matchers, bitmask, indices=self.rows)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                             vocab_size=self.vocab_size)
