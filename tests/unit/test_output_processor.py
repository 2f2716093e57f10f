import pytest

from rtserve.client.output_processor import OutputProcessor
from rtserve.protocol import EngineCoreOutput, TokenLogprob
from rtserve.sampling_params import SamplingParams

EOS = 0
FFFD = "\ufffd"


class FakeTokenizer:
    """id < 1000: the character chr(id); id >= 1000: the single byte id - 1000; 0: <eos> (special)."""

    special_token_ids = frozenset({EOS})

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        data = b"".join(b"<eos>" if t == EOS else bytes([t - 1000]) if t >= 1000 else chr(t).encode()
                        for t in ids if not (skip_special_tokens and t == EOS))
        return data.decode("utf-8", errors="replace")


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def byte_ids(text: str) -> list[int]:
    return [1000 + b for b in text.encode()]


def out(rid="r", tokens=(), **kw) -> EngineCoreOutput:
    return EngineCoreOutput(request_id=rid, new_token_ids=list(tokens), **kw)


def logprobs_for(tokens: list[int]) -> list[TokenLogprob]:
    return [TokenLogprob(token_id=t, logprob=-float(i)) for i, t in enumerate(tokens)]


@pytest.fixture
def proc() -> OutputProcessor:
    return OutputProcessor(FakeTokenizer())


def test_streams_text_counts_and_finishes_on_eos(proc):
    proc.add_request("r", ids("prompt"), SamplingParams(max_tokens=100))
    first, abort = proc.process(out(tokens=ids("Hel"), num_prompt_tokens=6, num_cached_tokens=4))
    assert (first.text, first.token_ids, first.finished, abort) == ("Hel", ids("Hel"), False, False)
    assert (first.num_prompt_tokens, first.num_cached_tokens, first.num_output_tokens) == (6, 4, 3)
    second, _ = proc.process(out(tokens=ids("lo")))
    assert (second.text, second.num_output_tokens, second.num_cached_tokens) == ("lo", 5, 4)
    last, abort = proc.process(out(tokens=[EOS], finish_reason="stop", stop_reason=EOS))
    assert (last.text, last.token_ids, last.finished) == ("", [EOS], True)
    assert (last.finish_reason, last.stop_reason, last.num_output_tokens, abort) == ("stop", EOS, 6, False)
    assert "r" not in proc and len(proc) == 0


def test_stop_string_across_tokens_and_outputs_truncates_tokens(proc):
    proc.add_request("r", ids("p"), SamplingParams(stop=["</s>"], logprobs=0))
    a, abort = proc.process(out(tokens=ids("ab</"), new_logprobs=logprobs_for(ids("ab</"))))
    assert (a.text, a.token_ids, abort) == ("ab", ids("ab</"), False)
    tokens = ids("s>cd")
    b, abort = proc.process(out(tokens=tokens, new_logprobs=logprobs_for(tokens)))
    assert abort is True
    assert (b.text, b.finished, b.finish_reason, b.stop_reason) == ("", True, "stop", "</s>")
    assert b.token_ids == ids("s>")  # up to and including the token that completed "</s>"
    assert [lp.token_id for lp in b.logprobs] == ids("s>")
    assert b.num_output_tokens == 6
    assert "r" not in proc


def test_include_stop_str_in_output(proc):
    proc.add_request("r", [], SamplingParams(stop=["END"], include_stop_str_in_output=True))
    res, abort = proc.process(out(tokens=ids("xEND after")))
    assert (res.text, res.token_ids, res.stop_reason, abort) == ("xEND", ids("xEND"), "END", True)


def test_held_back_stop_prefix_flushed_on_engine_finish(proc):
    proc.add_request("r", [], SamplingParams(stop=["END"]))
    res, _ = proc.process(out(tokens=ids("xEN")))
    assert res.text == "x"
    last, abort = proc.process(out(tokens=[EOS], finish_reason="stop", stop_reason=EOS))
    assert (last.text, last.finish_reason, last.stop_reason, abort) == ("EN", "stop", EOS, False)


def test_stop_string_and_engine_finish_in_same_output(proc):
    proc.add_request("r", [], SamplingParams(stop=["!"]))
    res, abort = proc.process(out(tokens=ids("hi!yo"), finish_reason="length"))
    assert (res.text, res.token_ids, res.finish_reason, res.stop_reason) == ("hi", ids("hi!"), "stop", "!")
    assert abort is False  # the engine has already finished it


def test_multibyte_stop_string_charged_to_completing_token(proc):
    proc.add_request("r", [], SamplingParams(stop=["é"]))
    tokens = byte_ids("aé") + ids("zz")
    res, abort = proc.process(out(tokens=tokens))
    assert (res.text, res.token_ids, abort) == ("a", tokens[:3], True)


def test_incomplete_utf8_held_then_flushed_on_length(proc):
    proc.add_request("r", [], SamplingParams())
    tokens = byte_ids("ok😀")
    res, _ = proc.process(out(tokens=tokens[:3]))
    assert res.text == "ok"
    res, _ = proc.process(out(tokens=tokens[3:5], finish_reason="length"))
    assert res.text == FFFD and res.finish_reason == "length"


def test_stream_equals_one_shot(proc):
    params = SamplingParams(stop=["STOP"])
    text = "héllo 世界 ST STO 😀 STOP tail"
    tokens = byte_ids(text)
    proc.add_request("stream", [], params)
    proc.add_request("once", [], params)
    streamed, n = "", 0
    for t in tokens:
        res, abort = proc.process(out("stream", [t]))
        streamed += res.text
        n += len(res.token_ids)
        assert FFFD not in res.text
        if res.finished:
            break
    once, _ = proc.process(out("once", tokens))
    assert streamed == once.text == "héllo 世界 ST STO 😀 "
    assert n == len(once.token_ids) == len(byte_ids("héllo 世界 ST STO 😀 STOP"))


def test_min_tokens_ignores_stop_strings_in_early_text(proc):
    proc.add_request("r", [], SamplingParams(stop=["x"], min_tokens=3))
    res, abort = proc.process(out(tokens=ids("axbxc")))
    # tokens 1..3 ("axb") cannot stop; the "x" that is token 4 does
    assert (res.text, res.token_ids, res.stop_reason, abort) == ("axb", ids("axbx"), "x", True)


def test_error_passes_through(proc):
    proc.add_request("r", [], SamplingParams(stop=["zz"]))
    proc.process(out(tokens=ids("az")))
    res, abort = proc.process(out(error="engine failed"))
    assert (res.finished, res.finish_reason, res.error, abort) == (True, "error", "engine failed", False)
    assert res.text == "z"  # held-back text is still delivered
    assert "r" not in proc


def test_abort_from_engine(proc):
    proc.add_request("r", [], SamplingParams())
    res, abort = proc.process(out(finish_reason="abort"))
    assert (res.finished, res.finish_reason, res.text, abort) == (True, "abort", "", False)


def test_skip_special_tokens_false_keeps_eos_text(proc):
    proc.add_request("r", [], SamplingParams(skip_special_tokens=False))
    res, _ = proc.process(out(tokens=ids("a") + [EOS], finish_reason="stop", stop_reason=EOS))
    assert res.text == "a<eos>"


def test_request_bookkeeping(proc):
    proc.add_request("r", [], SamplingParams())
    with pytest.raises(ValueError):
        proc.add_request("r", [], SamplingParams())
    proc.remove("r")
    proc.remove("r")  # idempotent
    with pytest.raises(KeyError):
        proc.process(out(tokens=ids("a")))
    proc.add_request("r", ids("abc"), SamplingParams())
    res, _ = proc.process(out(tokens=ids("d")))
    assert res.num_prompt_tokens == 3  # from the prompt when the engine does not say
