import itertools

import pytest

from rtserve.client.stop_strings import StopResult, StopStringMatcher


def run(stop, deltas, include=False):
    """Feed deltas until stopped; return (emitted text, matched, per-delta outputs)."""
    m = StopStringMatcher(stop, include)
    outs = []
    for d in deltas:
        r = m.feed(d)
        outs.append(r.text)
        if r.stopped:
            return "".join(outs), r.matched, outs
    outs.append(m.flush())
    return "".join(outs), None, outs


def test_stop_split_across_many_deltas_never_leaks():
    deltas = ["ABC", "DEF", "G", "HI", "J", "KLM"]  # vllm#3574
    text, matched, outs = run(["DEFGHIJ"], deltas)
    assert (text, matched) == ("ABC", "DEFGHIJ")
    assert outs == ["ABC", "", "", "", ""]


def test_every_split_of_the_text_gives_the_same_result():
    full = "say xxabab then abc!"
    stops = ["abc", "bab", "xab"]
    reference = run(stops, [full])[:2]
    assert reference == ("say x", "xab")
    for cuts in itertools.combinations(range(1, len(full)), 3):
        bounds = (0, *cuts, len(full))
        deltas = [full[a:b] for a, b in zip(bounds, bounds[1:])]
        assert run(stops, deltas)[:2] == reference  # nothing past "say x" ever leaks


def test_overlapping_candidates_earliest_end_then_longest():
    assert run(["abc", "b"], ["a", "b", "c"])[:2] == ("a", "b")
    assert run(["abc", "b"], ["abc"])[:2] == ("a", "b")  # same answer unsplit
    assert run(["ab", "b"], ["ab"])[:2] == ("", "ab")
    assert run(["b", "ab"], ["a", "b"])[:2] == ("", "ab")


def test_partial_prefix_released_when_it_stops_matching():
    m = StopStringMatcher(["hello"], False)
    assert m.feed("say hel") == StopResult("say ")
    assert m.feed("p me") == StopResult("help me")
    assert m.feed("he") == StopResult("")
    assert m.feed("hello") == StopResult("he", True, "hello")  # "hehello"


def test_overlapping_self_prefix():
    # "aab": after "aa" the held suffix must allow the match to start at the second 'a'.
    assert run(["aab"], ["a", "a", "a", "b", "c"])[:2] == ("a", "aab")


def test_stop_at_the_very_start():
    assert run(["</s>"], ["</", "s>", "more"])[:2] == ("", "</s>")
    m = StopStringMatcher(["STOP"], False)
    r = m.feed("STOP and more")
    assert r == StopResult("", True, "STOP")


def test_include_stop_str_in_output_truncates_after_match():
    text, matched, _ = run(["END"], ["abc E", "N", "Dxyz tail"], include=True)
    assert (text, matched) == ("abc END", "END")


def test_after_stop_everything_is_ignored():
    m = StopStringMatcher(["x"], False)
    assert m.feed("axb") == StopResult("a", True, "x")
    assert m.feed("more") == StopResult("", True, "x")
    assert m.flush() == ""
    assert m.stopped


def test_flush_releases_held_text():
    m = StopStringMatcher(["<|end|>"], False)
    assert m.feed("answer <|e") == StopResult("answer ")
    assert m.flush() == "<|e"
    assert m.flush() == ""


def test_no_stop_strings_passes_through():
    m = StopStringMatcher([], False)
    assert m.feed("anything") == StopResult("anything")
    assert m.flush() == ""


def test_empty_stop_string_rejected():
    with pytest.raises(ValueError):
        StopStringMatcher([""], False)


def test_multibyte_stop_string():
    assert run(["世界"], ["你好", "世", "界!"])[:2] == ("你好", "世界")
