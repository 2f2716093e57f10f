"""Tool-call grammar, prompt and parser (no model): streamed and whole parses agree, markers split
anywhere are held back, and the grammar accepts exactly the calls the parser reads."""
import json

import pytest

from rtserve.structured.check import GrammarError, check_structured
from rtserve.structured.tools import ToolCallParser, ToolSpec, render_call, tool_call_grammar, tools_system_prompt

WEATHER = ToolSpec("get_weather", "Weather in a city",
                   {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
TIME = ToolSpec("get_time", None, {"type": "object", "properties": {}})
TEXT = ("Let me check. " + render_call("get_weather", '{"city": "Paris"}') + "\n"
        + render_call("get_time", "{}") + "\nDone <tool_ tags")


def parse(chunks):
    parser, text, started, args = ToolCallParser(), "", [], {}
    for chunk in chunks:
        ev = parser.feed(chunk)
        text += ev.text
        started += ev.started
        for i, frag in ev.arguments:
            args[i] = args.get(i, "") + frag
    ev = parser.finish()
    text += ev.text
    return text, started, args, parser.calls


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(TEXT)])
def test_streamed_parse_matches_whole(size):
    text, started, args, calls = parse([TEXT[i:i + size] for i in range(0, len(TEXT), size)])
    assert text == "Let me check. Done <tool_ tags"
    assert started == [(0, "get_weather"), (1, "get_time")]
    assert args == {0: '{"city": "Paris"}', 1: "{}"}
    assert [c.is_complete for c in calls] == [True, True]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}


def test_truncated_call_is_incomplete():
    text, started, args, calls = parse([render_call("get_weather", '{"city": "Par')[:-14]])
    assert text == "" and started == [(0, "get_weather")] and not calls[0].is_complete


def test_marker_without_call_is_text():
    assert parse(["a <tool_call> b"])[0] == "a <tool_call> b"


def test_grammars_build_and_prompt_lists_tools():
    for mode in ("auto", "required", "get_time"):
        for parallel in (True, False):
            check_structured(tool_call_grammar([WEATHER, TIME], mode, parallel))
    assert tool_call_grammar([WEATHER], "none", True) is None
    assert '"name": "get_weather"' in tools_system_prompt([WEATHER, TIME])


def test_grammar_accepts_the_rendered_calls():
    import xgrammar as xgr
    spec = tool_call_grammar([WEATHER, TIME], "required", True)
    grammar = xgr.Grammar.from_structural_tag(xgr.StructuralTag.model_validate_json(spec.spec))
    ok = render_call("get_weather", '{"city": "Paris"}') + "\n" + render_call("get_time", "{}")
    assert xgr.testing._is_grammar_accept_string(grammar, ok)
    assert not xgr.testing._is_grammar_accept_string(grammar, "hello")
    assert not xgr.testing._is_grammar_accept_string(grammar, render_call("get_weather", '{"town": 1}'))
    single = tool_call_grammar([WEATHER, TIME], "required", False)
    grammar = xgr.Grammar.from_structural_tag(xgr.StructuralTag.model_validate_json(single.spec))
    assert not xgr.testing._is_grammar_accept_string(grammar, ok)


def test_bad_schema_is_refused():
    with pytest.raises(GrammarError):
        bad = ToolSpec("f", None, {"type": "object", "properties": {"a": {"type": "nope"}}})
        check_structured(tool_call_grammar([bad], "required", True))
