"""rtserve.api.sse: exact SSE framing (LF only, data-only for OpenAI, named events for Anthropic)."""
from rtserve.api.sse import SSE_DONE, dumps, sse_comment, sse_data, sse_event


def test_data_frame_is_exact():
    assert sse_data({"a": 1, "b": [None, "x"]}) == b'data: {"a":1,"b":[null,"x"]}\n\n'


def test_done_frame():
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_named_event_frame():
    assert sse_event("ping", {"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'


def test_no_crlf_and_utf8_kept():
    frame = sse_data({"t": "caf\u00e9 \u4e16 \U0001f600"})
    assert b"\r" not in frame
    assert frame == 'data: {"t":"caf\u00e9 \u4e16 \U0001f600"}\n\n'.encode()


def test_newlines_inside_text_are_escaped_so_a_frame_stays_one_line():
    frame = sse_data({"t": "a\n\nb"})
    assert frame.count(b"\n") == 2 and frame.endswith(b"\n\n")


def test_lone_surrogate_does_not_raise():
    assert sse_data({"t": "\ud800"}).startswith(b"data: ")


def test_comment():
    assert sse_comment("keep-alive") == b": keep-alive\n\n"


def test_dumps_is_compact():
    assert dumps({"a": 1}) == '{"a":1}'
