"""Default sampling per model: where the defaults come from (--generation-config auto|none|PATH and
the override), and the API applying them to fields a request leaves unset, explicit values winning,
shown in /v1/models."""
from __future__ import annotations

import json

import pytest

from rtserve.model.generation_config import SamplingDefaults, resolve_sampling_defaults
from rtserve.model.loader import default_model_path
from tests.integration.fake_engine import asgi_client, build_test_app

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
SMOL = SamplingDefaults(temperature=0.2, top_p=0.9, source="documented defaults for smollm2")


def test_auto_for_the_embedded_gguf_is_its_documented_defaults():
    defaults = resolve_sampling_defaults("auto", default_model_path())
    assert defaults == SMOL
    assert defaults.as_dict() == {"temperature": 0.2, "top_p": 0.9, "source": "documented defaults for smollm2"}
    assert resolve_sampling_defaults("none", default_model_path()) == SamplingDefaults()


def test_hf_directory_and_explicit_paths(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    assert resolve_sampling_defaults("auto", str(hf)) == SamplingDefaults()  # no generation_config.json
    (hf / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0, "eos_token_id": [1, 2]}))
    expected = dict(temperature=0.6, top_k=20, top_p=0.95, min_p=0)
    assert resolve_sampling_defaults("auto", str(hf)) == SamplingDefaults(
        **expected, source=f"file {hf / 'generation_config.json'}")
    other = tmp_path / "g.json"
    other.write_text(json.dumps({"temperature": 0.7, "repetition_penalty": 1.1}))
    got = resolve_sampling_defaults(str(other), default_model_path())
    assert (got.temperature, got.repetition_penalty, got.top_p) == (0.7, 1.1, None)
    assert resolve_sampling_defaults(str(hf), default_model_path()).top_k == 20  # a directory holding one
    over = resolve_sampling_defaults("auto", default_model_path(), {"temperature": 0.5, "top_k": 40})
    assert (over.temperature, over.top_p, over.top_k) == (0.5, 0.9, 40)
    assert over.source == "documented defaults for smollm2 + override"


@pytest.mark.parametrize("choice, override, match", [
    ("missing.json", None, "no such file"),
    ("bad.json", None, "unreadable"),
    ("strings.json", None, "temperature must be a finite number"),
    ("auto", {"temprature": 0.1}, "unknown field"),
    ("auto", {"top_k": 2.5}, "top_k must be an integer"),
])
def test_bad_generation_configs(tmp_path, choice, override, match):
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "strings.json").write_text(json.dumps({"temperature": "hot"}))
    path = choice if choice == "auto" else str(tmp_path / choice)
    with pytest.raises(ValueError, match=match):
        resolve_sampling_defaults(path, default_model_path(), override)


async def test_unset_fields_get_the_model_defaults_and_set_fields_win():
    app, engine = build_test_app(sampling_defaults=SamplingDefaults(temperature=0.2, top_p=0.9, top_k=50))
    async with asgi_client(app) as c:
        r = await c.post(CHAT, json={"messages": USER, "max_tokens": 1})
        p = engine.params[f"{r.json()['id']}-0"]
        assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (0.2, 0.9, 50, 0.0, 1.0)
        r = await c.post(CHAT, json={"messages": USER, "max_tokens": 1, "temperature": 0, "top_k": 0,
                                     "repetition_penalty": 1.2})
        p = engine.params[f"{r.json()['id']}-0"]
        assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.0, 0.9, 0, 1.2)
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "top_p": 1.0})
        p = engine.params[f"{r.json()['id']}-0"]
        assert (p.temperature, p.top_p, p.top_k) == (0.2, 1.0, 50)
        r = await c.post("/v1/messages", json={"model": "fake-model", "max_tokens": 1,
                                               "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        p = next(v for k, v in engine.params.items() if k.startswith(r.json()["id"]))
        assert (p.temperature, p.top_p, p.top_k) == (0.2, 0.9, 50)
        card = (await c.get("/v1/models")).json()["data"][0]
        assert card["sampling_defaults"] == {"temperature": 0.2, "top_p": 0.9, "top_k": 50, "min_p": 0.0,
                                             "repetition_penalty": 1.0, "source": "none"}


async def test_no_model_defaults_keeps_the_openai_defaults():
    app, engine = build_test_app()
    async with asgi_client(app) as c:
        r = await c.post(CHAT, json={"messages": USER, "max_tokens": 1})
        p = engine.params[f"{r.json()['id']}-0"]
        assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
        card = (await c.get("/v1/models")).json()["data"][0]
        assert card["sampling_defaults"]["temperature"] == 1.0


def test_server_flags(tmp_path):
    from rtserve.api.server import build_parser, engine_config_from_args, sampling_defaults_from_args

    def defaults(*argv):
        args = build_parser().parse_args(list(argv))
        return sampling_defaults_from_args(args, engine_config_from_args(args))

    assert defaults() == SMOL  # the embedded SmolLM2 under the default --generation-config auto
    assert defaults("--generation-config", "none") == SamplingDefaults()
    over = defaults("--override-generation-config", '{"temperature": 0.7, "min_p": 0.05}')
    assert (over.temperature, over.top_p, over.min_p) == (0.7, 0.9, 0.05)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--override-generation-config", "[1]"])
    with pytest.raises(ValueError, match="no such file"):
        defaults("--generation-config", str(tmp_path / "nope.json"))
