"""The step-time model between starts: its JSON round trip, the calibration file's key, and files
that must be ignored (corrupt, measured on something else)."""
import json
import logging
import random

import pytest

from rtserve.api.metrics import ServingMetrics
from rtserve.engine.cost_model import StepCostModel, StepFeatures, prefill_pairs
from rtserve.engine.cost_model_store import CostModelStore, calibration_key, cpu_identity
from rtserve.protocol import EngineStats

FIELDS = {"model": "/m/model.gguf 1234", "backend": "cpu fast torch.bfloat16", "num_threads": 2,
          "cpu": "machine: x86_64\nmodel name: Some CPU\nflags: avx2 avx512f"}


def measured_model(n: int = 80, seed: int = 0) -> StepCostModel:
    rng = random.Random(seed)
    model = StepCostModel()
    for _ in range(n):
        prefill, start = rng.choice([0, 0, 16, 64, 256, 512]), rng.choice([0, 512, 1024])
        pairs = prefill_pairs(prefill, start) if prefill else 0
        f = StepFeatures(rng.randint(0, 32), prefill, rng.randint(0, 8000), pairs)
        model.observe(f, (0.004 + 0.0008 * f.num_decodes + 0.0011 * prefill) * rng.uniform(0.9, 1.3))
    return model


def test_json_round_trip_restores_a_calibrated_model_at_once():
    model = measured_model()
    state = json.loads(json.dumps(model.to_json()))  # plain JSON values only
    restored = StepCostModel()
    assert not restored.is_calibrated and restored.trusted_prefill_tokens == 64
    restored.load_json(state)
    assert restored.is_calibrated and restored.num_samples == 80
    assert restored.trusted_prefill_tokens == model.trusted_prefill_tokens == 1024
    assert restored.overrun_ratio == pytest.approx(model.overrun_ratio)
    assert restored.overrun_ratio != 1.5  # measured from the window, not the prior
    assert (restored.mean_abs_error_s, restored.mean_rel_error) == (model.mean_abs_error_s, model.mean_rel_error)
    for f in (StepFeatures(1, 0, 100), StepFeatures(16, 0, 4000), StepFeatures(0, 512, 512, prefill_pairs(512))):
        assert restored.predict_s(f) == pytest.approx(model.predict_s(f), rel=1e-9)


def test_malformed_state_raises_and_changes_nothing():
    model = measured_model(40)
    before = model.to_json()
    for bad in ({"samples": "x"}, {"samples": [[1, 2, 3]]}, {"samples": [[1, 2, 3, 4, 5, float("nan")]]},
                {"samples": [[1, 2.5, 3, 4, 5, 0.1]]}, {"samples": [[-1, 2, 3, 4, 5, 0.1]]},
                {"samples": [], "mean_rel_error": -1}):
        with pytest.raises(ValueError):
            model.load_json(bad)
        assert model.to_json() == before
    model.load_json({"samples": []})  # the prior again
    assert not model.is_calibrated and model.coeffs == StepCostModel().coeffs


def test_store_saves_atomically_and_loads_only_a_matching_file(tmp_path):
    store = CostModelStore(str(tmp_path / "calibration"), dict(FIELDS))
    store.save(measured_model())
    assert [p.name for p in (tmp_path / "calibration").iterdir()] == [store.path.rsplit("/", 1)[1]]
    model = StepCostModel()
    assert store.load(model) and model.is_calibrated
    for field, other in (("num_threads", 4), ("backend", "cpu reference torch.float32"), ("cpu", "machine: aarch64")):
        elsewhere = CostModelStore(store.directory, {**FIELDS, field: other})
        assert elsewhere.path != store.path and not elsewhere.load(StepCostModel())


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 1}', "\x00\xff"])
def test_corrupt_or_mismatched_file_is_ignored_with_a_warning(tmp_path, caplog, content):
    store = CostModelStore(str(tmp_path), dict(FIELDS))
    with open(store.path, "w", encoding="latin-1") as f:
        f.write(content)
    model = StepCostModel()
    with caplog.at_level(logging.WARNING, logger="rtserve.engine"):
        assert not store.load(model)
    assert "ignoring the cost model cache" in caplog.text
    assert not model.is_calibrated and model.num_samples == 0


def test_file_with_the_right_key_but_bad_samples_is_ignored(tmp_path, caplog):
    store = CostModelStore(str(tmp_path), dict(FIELDS))
    with open(store.path, "w") as f:
        json.dump({"version": 1, "key": FIELDS, "model": {"samples": [["x"]]}}, f)
    with caplog.at_level(logging.WARNING, logger="rtserve.engine"):
        assert not store.load(StepCostModel())
    assert "samples" in caplog.text


def test_save_if_newer_keeps_the_prefill_range(tmp_path):
    store = CostModelStore(str(tmp_path), dict(FIELDS))
    model = measured_model()
    store.save(model)
    assert not store.save_if_newer(model)  # nothing measured since
    for _ in range(256):  # the window now holds decode steps only: the large steps are kept beside it
        model.observe(StepFeatures(4, 0, 400), 0.01)
    range_before = model.trusted_prefill_tokens
    model._kept.clear()  # as if they had been pushed out: the trusted prefill range shrank
    assert model.trusted_prefill_tokens == 64 < range_before and not store.save_if_newer(model)
    model.observe(StepFeatures(0, 512, 512, prefill_pairs(512)), 0.5)
    assert store.save_if_newer(model)


def test_key_names_model_backend_threads_and_cpu():
    keys = {calibration_key(FIELDS)} | {calibration_key({**FIELDS, k: v}) for k, v in (
        ("model", "/m/other.gguf 99"), ("backend", "cpu reference torch.float32"), ("num_threads", 1),
        ("cpu", FIELDS["cpu"] + " amx_tile"))}
    assert len(keys) == 5 and calibration_key(dict(FIELDS)) == calibration_key(FIELDS)


def test_cpu_identity_x86_aarch64_and_missing(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n"
                   "bogomips\t: 4000\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\n"
                   "CPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd40\n\n")
    got_x86, got_arm = cpu_identity(str(x86)), cpu_identity(str(arm))
    assert "model name: AMD EPYC" in got_x86 and "flags: fpu avx2" in got_x86 and "bogomips" not in got_x86
    assert "Features: fp asimd sve" in got_arm and "CPU part: 0xd40" in got_arm
    assert cpu_identity(str(tmp_path / "missing")).startswith("machine: ")
    assert len({got_x86, got_arm, cpu_identity(str(tmp_path / "missing"))}) == 3
    assert cpu_identity()  # this machine's, whatever it is


def test_metrics_name_the_cost_model_source():
    body = ServingMetrics("m").render(EngineStats(cost_model_source="cache"))
    assert 'rtserve:step_cost_model_source{model_name="m",source="cache"} 1' in body
