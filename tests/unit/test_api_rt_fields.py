"""The `rt` request extension at the API edge: parsing, service_tier mapping, refusals, reporting."""
import pytest

from rtserve.api.errors import ApiError
from rtserve.api.rt_fields import deadline_error, parse_rt, rejection_error, rt_object, server_timing
from rtserve.client.async_llm import AdmissionRejected
from rtserve.client.rt_report import RTTracker
from rtserve.engine.admission import AdmissionDecision
from rtserve.protocol import RTParams


def test_parse_rt_and_service_tier():
    assert parse_rt(None) is None
    assert parse_rt({"class": "firm", "ttft_ms": 300, "itl_ms": 50, "deadline_ms": 4000}) == \
        RTParams("firm", 0.3, 0.05, 4.0)
    assert parse_rt(None, "priority") == RTParams("firm")
    assert parse_rt(None, "auto") == RTParams("soft") == parse_rt(None, "default")
    assert parse_rt(None, "flex") == RTParams("batch")
    assert parse_rt({"ttft_ms": 200}, "priority") == RTParams("firm", ttft_s=0.2)
    assert parse_rt({"class": "soft"}, "priority").rt_class == "soft"  # rt.class wins


@pytest.mark.parametrize("raw,tier,param", [
    ({"class": "hard"}, None, "rt.class"), ({"class": "urgent"}, None, "rt.class"),
    ({"ttft_ms": -5}, None, "rt.ttft_ms"), ({"itl_ms": "fast"}, None, "rt.itl_ms"),
    ({"deadline_ms": True}, None, "rt.deadline_ms"), ({"ttft": 5}, None, "rt.ttft"),
    ("firm", None, "rt"), (None, "scale", "service_tier")])
def test_bad_rt_fields_are_400_naming_the_field(raw, tier, param):
    with pytest.raises(ApiError) as exc:
        parse_rt(raw, tier)
    assert exc.value.status == 400 and exc.value.param == param


def test_hard_explains_why_and_suggests_firm():
    with pytest.raises(ApiError) as exc:
        parse_rt({"class": "hard"})
    assert "garbage collector" in exc.value.message and "'firm'" in exc.value.message


def test_rejection_is_429_or_529_with_retry_after_headers():
    exc = AdmissionRejected(AdmissionDecision(False, 0.9, 0.4, "ttft", "firm request refused"), "firm")
    err = rejection_error(exc)
    assert err.status == 429 and err.headers == {"retry-after": "1", "retry-after-ms": "400"}
    assert err.code == "deadline_unattainable"
    assert rejection_error(exc, anthropic=True).status == 529
    full = AdmissionRejected(AdmissionDecision(False, 0.0, 2.5, "queue_full", "overloaded"), "soft")
    assert rejection_error(full).headers["retry-after"] == "3" and rejection_error(full).code == "queue_full"
    assert deadline_error("deadline: ttft").status == 504


def test_server_timing_and_rt_object():
    t = RTTracker(RTParams("firm", 0.3, 0.05, None), 0.0)
    for now in (0.1, 0.12, 0.2):
        t.on_tokens(1, now)
    report = t.finish(0.2, "stop")
    value = server_timing([report])
    assert value.startswith("ttft;dur=100.0, itl-p50;dur=20.0") and 'rt;desc="firm missed itl"' in value
    assert rt_object([report])["missed"] == ["itl"] and rt_object([None]) is None
    assert rt_object([report, report])["choices"][1]["class"] == "firm"
