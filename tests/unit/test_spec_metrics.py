"""/metrics exports the speculative decoding counters under vLLM's names."""
from rtserve.api.metrics import ServingMetrics
from rtserve.protocol import EngineStats, SpecDecodeStats
from tests.unit.test_api_metrics import parse


def test_spec_decode_counters_rendered_with_vllm_names():
    spec = SpecDecodeStats("ngram", num_drafts=10, num_draft_tokens=30, num_accepted_tokens=17,
                           num_accepted_tokens_per_pos=[9, 5, 3])
    assert spec.acceptance_rate == 17 / 30 and spec.mean_accepted_len == 2.7
    got = parse(ServingMetrics("m").render(EngineStats(spec_decode=spec)))
    assert got['vllm:spec_decode_num_drafts_total{model_name="m"}'] == 10
    assert got['vllm:spec_decode_num_draft_tokens_total{model_name="m"}'] == 30
    assert got['vllm:spec_decode_num_accepted_tokens_total{model_name="m"}'] == 17
    assert got['vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="2"}'] == 3


def test_no_spec_decode_series_when_off():
    assert "spec_decode" not in ServingMetrics("m").render(EngineStats())
