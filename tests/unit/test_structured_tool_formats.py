"""Tool-call formats besides Hermes (no model): Llama 3 JSON and Mistral. For each, the format is
chosen from the chat template, calls split anywhere parse as they do whole, the grammar accepts
exactly what the parser reads as complete calls, and a template that renders tools gets them natively."""
import codecs
import re
import json

import pytest

from rtserve.api.tool_fields import render_turns
from rtserve.client.tokenizer import Tokenizer
from rtserve.structured.check import check_structured
from rtserve.structured.tool_formats import (HERMES, LLAMA3_JSON, MistralFormat, choose_tool_format,
                                             mistral_call_id)
from rtserve.structured.tools import ToolSpec, Turn

WEATHER = ToolSpec("get_weather", "Weather in a city",
                   {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
SEARCH = ToolSpec("search", None, {"type": "object", "properties": {
    "q": {"type": "string"}, "filters": {"type": "object", "properties": {"tags": {"type": "array"}}}}})
# Arguments whose strings hold brackets, quotes and escapes: the end of a call is found by counting
# brackets outside strings.
TRICKY = '{"q": "a}b]{\\"c\\"", "filters": {"tags": ["x", {"y": "}"}]}}'
MISTRAL = MistralFormat()
MISTRAL_ARGS = MistralFormat(args_marker=True)

# The tool-calling parts of Llama 3.1's and Mistral v0.3's templates, shortened.
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if tools is not none and messages|length > 0 %}
{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}<|eot_id|>
{%- endif %}
{%- for message in messages %}
{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- elif 'tool_calls' in message %}{%- set tool_call = message.tool_calls[0].function %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + "}<|eot_id|>" }}
{%- else %}{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message.content + "<|eot_id|>" }}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

MISTRAL_TEMPLATE = """{{- bos_token }}{%- for message in messages %}
{%- if message["role"] == "user" %}{%- if tools is defined and tools is not none and loop.first %}
{{- "[AVAILABLE_TOOLS] [" }}{%- for tool in tools %}{{- tool | tojson }}{%- if not loop.last %}, {% endif %}{%- endfor %}
{{- "][/AVAILABLE_TOOLS]" }}{%- endif %}{{- "[INST] " + message["content"] + "[/INST]" }}
{%- elif message.tool_calls is defined and message.tool_calls is not none %}{{- "[TOOL_CALLS] [" }}
{%- for tool_call in message.tool_calls %}{%- set out = tool_call.function|tojson %}{{- out[:-1] }}
{%- if not tool_call.id is defined or tool_call.id|length != 9 %}
{{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}{%- endif %}
{{- ', "id": "' + tool_call.id + '"}' }}{%- if not loop.last %}, {% else %}]{{ eos_token }}{% endif %}{%- endfor %}
{%- elif message["role"] == "tool" %}
{%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
{{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}{%- endif %}
{{- '[TOOL_RESULTS] {"content": ' + message.content + ', "call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
{%- endif %}{%- endfor %}"""

TURNS = [Turn("user", "Weather in Paris?"),
         Turn("assistant", "", calls=[("call_abc", "get_weather", {"city": "Paris"})]),
         Turn("tool", '"sunny"', call_id="call_abc")]


def parse(fmt, chunks):
    parser, text, started, args = fmt.parser(), "", [], {}
    for chunk in chunks:
        ev = parser.feed(chunk)
        text += ev.text
        started += ev.started
        for i, frag in ev.arguments:
            args[i] = args.get(i, "") + frag
    ev = parser.finish()
    text += ev.text
    for i, frag in ev.arguments:
        args[i] = args.get(i, "") + frag
    return text, started, args, parser.calls


def pieces(text, size):
    return [text[i:i + size] for i in range(0, len(text), size)]


def test_format_chosen_from_the_template_or_by_name():
    assert choose_tool_format(LLAMA31_TEMPLATE) is LLAMA3_JSON
    assert choose_tool_format("{{ '<|python_tag|>' }}") is LLAMA3_JSON
    mistral = choose_tool_format(MISTRAL_TEMPLATE)
    assert mistral.name == "mistral" and not mistral.args_marker
    assert choose_tool_format("[TOOL_CALLS]{{ name }}[ARGS]{{ args }}").args_marker
    assert choose_tool_format("<tool_call>{{ tools }}") is HERMES and choose_tool_format(None) is HERMES
    assert choose_tool_format("<tool_call>{{ 'ipython' }}") is HERMES  # its own marker wins
    assert choose_tool_format(None, "llama3_json") is LLAMA3_JSON
    with pytest.raises(ValueError):
        choose_tool_format(None, "pythonic")


LLAMA_TEXT = ('{"name": "get_weather", "parameters": {"city": "Paris"}}; '
              '<|python_tag|>{"name": "search", "arguments": ' + TRICKY + '}')
MISTRAL_TEXT = ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "search", "arguments": ' + TRICKY + ', "id": "abcdefghi"}] then text')
ARGS_TEXT = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]search[ARGS]' + TRICKY


@pytest.mark.parametrize("fmt,text,tail", [(LLAMA3_JSON, LLAMA_TEXT, ""), (MISTRAL, MISTRAL_TEXT, "then text"),
                                           (MISTRAL_ARGS, ARGS_TEXT, "")], ids=["llama", "mistral", "mistral-args"])
@pytest.mark.parametrize("size", [1, 2, 5, 13, 10_000])
def test_streamed_parse_matches_whole(fmt, text, tail, size):
    out, started, args, calls = parse(fmt, pieces("Sure. " + text, size))
    assert out == "Sure. " + tail
    assert started == [(0, "get_weather"), (1, "search")]
    assert args == {0: '{"city": "Paris"}', 1: TRICKY}
    assert [c.is_complete for c in calls] == [True, True]
    assert json.loads(calls[1].arguments)["q"] == 'a}b]{"c"'


@pytest.mark.parametrize("fmt,text", [(LLAMA3_JSON, '{"name": "get_weather", "parameters": {"city": "Pa'),
                                      (MISTRAL, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Pa'),
                                      (MISTRAL_ARGS, '[TOOL_CALLS]get_weather[ARGS]{"city": "Pa')])
def test_truncated_call_is_incomplete(fmt, text):
    out, started, args, calls = parse(fmt, pieces(text, 3))
    assert out == "" and started == [(0, "get_weather")] and args == {0: '{"city": "Pa'}
    assert not calls[0].is_complete


def test_text_that_only_looks_like_a_call_stays_text():
    text = 'a {"b": 1} [x] {"name": 3} [TOOL_CALLS] nope {'
    assert parse(LLAMA3_JSON, pieces(text, 1))[0] == text
    assert parse(MISTRAL, pieces(text, 1))[0] == text


def test_markers_dropped_with_special_tokens_still_parse():
    assert parse(LLAMA3_JSON, ['{"name": "get_weather", "parameters": {"city": "P"}}'])[3][0].is_complete
    _, started, _, calls = parse(MISTRAL, [' [{"name": "get_weather", "arguments": {"city": "P"}}]'])
    assert started == [(0, "get_weather")] and calls[0].is_complete


def _accepts(spec, text):
    import xgrammar as xgr
    grammar = xgr.Grammar.from_structural_tag(xgr.StructuralTag.model_validate_json(spec.spec))
    return xgr.testing._is_grammar_accept_string(grammar, text)


@pytest.mark.parametrize("fmt", [LLAMA3_JSON, MISTRAL, MISTRAL_ARGS], ids=["llama", "mistral", "mistral-args"])
def test_grammar_accepts_what_the_parser_reads(fmt):
    for mode in ("auto", "required", "search"):
        for parallel in (True, False):
            check_structured(fmt.grammar([WEATHER, SEARCH], mode, parallel))
    assert fmt.grammar([WEATHER], "none", True) is None
    one = fmt.render_call("get_weather", '{"city": "Paris"}')
    required = fmt.grammar([WEATHER, SEARCH], "required", True)
    assert _accepts(required, one)
    assert not _accepts(required, "hello")
    assert not _accepts(required, fmt.render_call("get_weather", '{"town": "Paris"}'))
    assert not _accepts(fmt.grammar([WEATHER, SEARCH], "search", True), one)
    assert _accepts(fmt.grammar([WEATHER, SEARCH], "auto", True), "Let me look. " + one)
    assert _accepts(fmt.grammar([WEATHER, SEARCH], "auto", True), "No tools needed.")
    two = {LLAMA3_JSON: LLAMA_TEXT.replace("<|python_tag|>", "").replace('"arguments"', '"parameters"'),
           MISTRAL: MISTRAL_TEXT.replace(', "id": "abcdefghi"', "").replace(" then text", ""),
           MISTRAL_ARGS: ARGS_TEXT}[fmt]
    assert _accepts(required, two)
    assert not _accepts(fmt.grammar([WEATHER, SEARCH], "required", False), two)
    _, _, _, calls = parse(fmt, [two])
    assert [c.name for c in calls if c.is_complete] == ["get_weather", "search"]


def _tokenizer(template):
    smol = Tokenizer.load()
    return Tokenizer(smol.backend, bos_token_id=smol.bos_token_id, eos_token_ids=smol.eos_token_ids,
                     chat_template=template, template_tokens={"bos_token": "", "eos_token": "</s>"})


def test_llama_template_renders_tools_and_calls_natively():
    tok = _tokenizer(LLAMA31_TEMPLATE)
    fmt = choose_tool_format(tok.chat_template)
    text = tok.decode(render_turns(tok, TURNS, [WEATHER], fmt=fmt))
    assert '"name": "get_weather"' in text and '"parameters": {' in text
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n\"sunny\"" in text


def test_mistral_template_gets_nine_character_call_ids():
    tok = _tokenizer(MISTRAL_TEMPLATE)
    fmt = choose_tool_format(tok.chat_template)
    text = tok.decode(render_turns(tok, TURNS, [WEATHER], fmt=fmt))
    call_id = mistral_call_id("call_abc")
    assert len(call_id) == 9 and call_id.isalnum() and mistral_call_id("abcdefghi") == "abcdefghi"
    assert text.startswith('[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_weather"')
    assert f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {{"city": "Paris"}}, "id": "{call_id}"}}]' in text
    assert f'"call_id": "{call_id}"}}[/TOOL_RESULTS]' in text


def test_a_named_format_without_a_native_template_gets_its_generic_prompt():
    smol = Tokenizer.load()
    text = smol.decode(render_turns(smol, TURNS, [WEATHER], fmt=LLAMA3_JSON))
    assert 'Respond in the format {"name": function name, "parameters":' in text
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in text


def test_properties_keep_the_schemas_order():
    from rtserve.api.structured_fields import parse_schema_spec
    tool = ToolSpec("f", None, {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "integer"}},
                                "required": ["z", "a"]})
    for fmt in (HERMES, LLAMA3_JSON, MISTRAL):
        assert _accepts(fmt.grammar([tool], "required", True), fmt.render_call("f", '{"z": 1, "a": 2}'))
    assert list(json.loads(parse_schema_spec(tool.parameters, "x").spec)["properties"]) == ["z", "a"]


BOUNDED = ToolSpec("get_weather", None, {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 6}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "opts": {"type": "array", "items": {"enum": ["}", "]", '"']}, "maxItems": 2}}, "required": ["city"],
    "additionalProperties": False})


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON, MISTRAL, MISTRAL_ARGS],
                         ids=["hermes", "llama", "mistral", "mistral-args"])
def test_tiny_model_constrained_calls_always_parse(tiny_weights, fmt):
    """Random weights write odd strings: each constrained output parses, streamed token by token, into
    complete calls whose arguments validate."""
    import jsonschema_rs

    from tests.unit.conftest import run_to_completion
    from tests.unit.test_structured_engine import EOS, add, engine, text
    core = engine(tiny_weights)
    for i, mode in enumerate(["required", "get_weather", "required"]):
        add(core, f"r{i}", fmt.grammar([BOUNDED], mode, i != 2), max_tokens=120,
            temperature=0.0 if i == 0 else 1.0, seed=i)
    for ids in run_to_completion(core).values():
        if ids[-1] != EOS:  # parallel calls may go on to max_tokens: their complete calls still count
            continue
        # The byte vocabulary, read one code point per character as the grammar counts them: the grammar
        # engine admits surrogate code points (bytes ED A0-BF ..) inside JSON strings, which strict
        # UTF-8 refuses and a lossy decode turns into three U+FFFD each (so a 6-character string
        # became 8). Each surrogate is read as one U+FFFD: a valid string of the grammar's length.
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="surrogatepass")
        pieces = [re.sub("[\ud800-\udfff]", "\ufffd", utf8.decode(bytes([t]))) for t in ids if t != EOS]
        _, started, args, calls = parse(fmt, pieces)
        assert calls and all(c.is_complete for c in calls), text(ids)
        for i, call in enumerate(calls):
            assert call.name == "get_weather" and args[i] == call.arguments
            jsonschema_rs.validate(BOUNDED.parameters, json.loads(call.arguments))


def test_length_bounded_json_strings_refuse_control_characters():
    import xgrammar as xgr

    from rtserve.structured.compiler import json_strings_fixed
    schema = json.dumps({"type": "object", "properties": {"s": {"type": "string", "maxLength": 4}}})
    loose = xgr.Grammar.from_json_schema(schema, any_whitespace=False)
    fixed = json_strings_fixed(loose) or loose  # None once xgrammar writes such strings correctly itself
    assert not xgr.testing._is_grammar_accept_string(fixed, '{"s": "a\x10"}')
    assert xgr.testing._is_grammar_accept_string(fixed, '{"s": "ab"}')
    assert json_strings_fixed(xgr.Grammar.from_json_schema('{"type": "string"}')) is None
