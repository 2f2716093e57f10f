"""rtserve.bench.sse: stream splitting across reads, comments, CRLF, errors, usage and rt."""
from __future__ import annotations

import json

from rtserve.bench.sse import SseSplitter, StreamState


def _chunk(content: str | None, **extra) -> str:
    obj = {"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": content}, "finish_reason": None}], **extra}
    return "data: " + json.dumps(obj) + "\n\n"


def test_split_across_reads_with_comments_and_crlf():
    stream = (": keep-alive\n\n" + _chunk("Hel") + _chunk("lo").replace("\n\n", "\r\n\r\n")
              + "data:[DONE]\n\n")
    splitter, payloads = SseSplitter(), []
    for i in range(0, len(stream), 7):  # arbitrary read boundaries, CRLF split included
        payloads += splitter.feed(stream[i:i + 7])
    assert len(payloads) == 3 and payloads[-1] == "[DONE]"
    assert json.loads(payloads[1])["choices"][0]["delta"]["content"] == "lo"


def test_multiline_data_event_is_joined():
    assert SseSplitter().feed('event: x\ndata: {"a":\ndata: 1}\n\n') == ['{"a":\n1}']


def test_state_counts_chunks_usage_and_rt():
    state = StreamState()
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    state.on_payload(json.dumps(role), 1.0)
    state.on_payload(_chunk("a")[6:-2], 1.5)
    state.on_payload(_chunk("b")[6:-2], 2.0)
    usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3,
                                      "prompt_tokens_details": {"cached_tokens": 4}},
             "rt": {"class": "firm", "met": True}}
    state.on_payload(json.dumps(usage), 9.0)  # the usage chunk carries no token: no timestamp
    state.on_payload("[DONE]", 9.5)
    assert state.chunk_times_s == [1.0, 1.5, 2.0]
    assert state.content_times_s == [1.5, 2.0]  # the role chunk carries no text
    assert state.num_content_chunks == 2
    assert (state.completion_tokens, state.prompt_tokens, state.cached_tokens) == (3, 7, 4)
    assert state.server_rt == {"class": "firm", "met": True}
    assert state.done and state.error is None


def test_completions_text_chunks_count():
    state = StreamState()
    state.on_payload('{"choices":[{"index":0,"text":"x","finish_reason":null}]}', 0.1)
    assert state.num_content_chunks == 1 and state.chunk_times_s == [0.1]


def test_mid_stream_error_and_bad_json():
    state = StreamState()
    state.on_payload('{"error": {"message": "engine died", "type": "server_error"}}', 1.0)
    assert state.error == "stream error: engine died"
    bad = StreamState()
    bad.on_payload("{not json", 1.0)
    assert bad.error.startswith("malformed")


def test_finish_reason_is_kept_and_a_deadline_stop_is_a_drop():
    from rtserve.bench.client import RequestRecord, RequestStatus, _finish
    state = StreamState()
    state.on_payload('{"choices":[{"index":0,"delta":{"role":"assistant","content":"a"}}]}', 0.1)
    state.on_payload('{"choices":[{"index":0,"delta":{},"finish_reason":"deadline"}]}', 0.2)
    assert state.finish_reason == "deadline"
    record = RequestRecord(0, "firm", 10, 16, 0.0)
    _finish(record, state, 0.0, 0.3)
    assert record.status == RequestStatus.DROPPED and record.finish_reason == "deadline"
    done = StreamState()
    done.on_payload('{"choices":[{"index":0,"text":"x","finish_reason":"length"}]}', 0.1)
    record = RequestRecord(1, "firm", 10, 16, 0.0)
    _finish(record, done, 0.0, 0.2)
    assert record.status == RequestStatus.OK and record.finish_reason == "length"


def test_a_deadline_finish_chunk_is_timed_but_is_not_a_token():
    state = StreamState()
    state.on_payload(_chunk("a")[6:-2], 1.0)
    state.on_payload('{"choices":[{"index":0,"delta":{},"finish_reason":"deadline"}]}', 1.3)
    assert state.chunk_times_s == [1.0, 1.3] and state.content_times_s == [1.0]
    assert state.finish_reason == "deadline"
