"""Grammar compilation off the engine loop, cached by the grammar's source.

`GrammarService.submit(spec)` returns a future of the compiled grammar: the first request with a
given source starts a compile on a worker thread (xgrammar releases the GIL while it compiles), and
later requests with the same source share the future. The engine submits when a request arrives, so
the compile overlaps the request's queueing and prefill and counts against its TTFT, not against
other requests' steps. The vocabulary (`TokenizerInfo`) is built on the first compile.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from rtserve.sampling_params import StructuredOutputs

MAX_CACHED_GRAMMARS = 256


# xgrammar (0.2.9) writes a JSON string with minLength / maxLength as a bounded repetition of
# [^"\\\r\n], which lets raw control characters (U+0000-U+001F) through: invalid JSON, that
# json.loads refuses. Such grammars get the character class JSON strings allow.
_LOOSE_STRING_CHAR = '[^\\"\\\\\\r\\n]'
_JSON_STRING_CHAR = '[^\\0-\\x1f\\"\\\\\\r\\n]'


def json_strings_fixed(grammar: Any) -> Any | None:
    """`grammar` with its loose string characters tightened (None when it has none)."""
    import xgrammar as xgr
    text = str(grammar)
    if _LOOSE_STRING_CHAR not in text:
        return None
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))


def compile_spec(compiler: Any, spec: StructuredOutputs) -> Any:
    """One xgrammar CompiledGrammar for `spec` (raises on an invalid grammar)."""
    import xgrammar as xgr
    if spec.kind == "json":
        fixed = json_strings_fixed(xgr.Grammar.from_json_schema(spec.spec, any_whitespace=False))
        if fixed is not None:
            return compiler.compile_grammar(fixed)
        return compiler.compile_json_schema(spec.spec, any_whitespace=False)
    if spec.kind == "json_object":
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
    if spec.kind == "regex":
        return compiler.compile_regex(spec.spec)
    if spec.kind == "choice":
        return compiler.compile_grammar(choice_grammar(json.loads(spec.spec)))
    if spec.kind == "grammar":
        return compiler.compile_grammar(spec.spec)
    if spec.kind == "structural_tag":
        tag = xgr.StructuralTag.model_validate_json(spec.spec)
        fixed = json_strings_fixed(xgr.Grammar.from_structural_tag(tag))
        return compiler.compile_grammar(fixed) if fixed is not None else compiler.compile_structural_tag(tag)
    raise ValueError(f"unknown structured output kind {spec.kind!r}")


def choice_grammar(choices: list[str]) -> Any:
    """EBNF accepting exactly one of `choices` (each written as a JSON string literal, which EBNF reads)."""
    import xgrammar as xgr
    return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in choices))


class GrammarService:
    """Compiles grammars for one vocabulary. `make_tokenizer_info` runs once, on the first compile."""

    def __init__(self, make_tokenizer_info: Callable[[], Any], max_threads: int = 2) -> None:
        self._make_tokenizer_info = make_tokenizer_info
        self._compiler = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="rtserve-grammar")
        self._futures: OrderedDict[tuple[str, str], Future] = OrderedDict()

    def submit(self, spec: StructuredOutputs) -> Future:
        """The compiled grammar of `spec`, as a future; shared with earlier requests of the same source."""
        with self._lock:
            future = self._futures.get(spec.key)
            if future is not None and not (future.done() and future.exception() is not None):
                self._futures.move_to_end(spec.key)
                return future
            future = self._pool.submit(self._compile, spec)
            self._futures[spec.key] = future
            while len(self._futures) > MAX_CACHED_GRAMMARS:
                self._futures.popitem(last=False)
            return future

    def _compile(self, spec: StructuredOutputs) -> Any:
        return compile_spec(self.compiler, spec)

    @property
    def compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr
                self._compiler = xgr.GrammarCompiler(self._make_tokenizer_info(), max_threads=2)
            return self._compiler

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
