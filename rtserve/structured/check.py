"""API-side checks of a grammar before the request reaches the engine: build it (xgrammar, no
vocabulary needed) and turn any failure into a `GrammarError` with xgrammar's own reason."""
from __future__ import annotations

import functools
import json
import re

from rtserve.sampling_params import StructuredOutputs

_CPP_PREFIX = re.compile(r"^\[[0-9:]+\] [^ ]+: ")


class GrammarError(ValueError):
    """The grammar of `spec` cannot be built; the message says why."""


@functools.lru_cache(maxsize=512)
def check_structured(spec: StructuredOutputs) -> None:
    """Raise GrammarError if `spec` does not build (cached by source; valid sources only)."""
    import xgrammar as xgr
    try:
        if spec.kind == "json":
            xgr.Grammar.from_json_schema(spec.spec, any_whitespace=False)
        elif spec.kind == "regex":
            xgr.Grammar.from_regex(spec.spec)
        elif spec.kind == "choice":
            from rtserve.structured.compiler import choice_grammar
            choice_grammar(json.loads(spec.spec))
        elif spec.kind == "grammar":
            xgr.Grammar.from_ebnf(spec.spec)
        elif spec.kind == "structural_tag":
            xgr.Grammar.from_structural_tag(xgr.StructuralTag.model_validate_json(spec.spec))
    except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError/pydantic errors
        raise GrammarError(reason(exc)) from None


def reason(exc: BaseException) -> str:
    """xgrammar's message without its C++ source location."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _CPP_PREFIX.sub("", text)[:300]
