"""rtserve.api.server: command-line flags -> EngineConfig / ServerSettings."""
from __future__ import annotations

import pytest

from rtserve.api.server import build_parser, engine_config_from_args, settings_from_args
from rtserve.config import EngineConfig


def test_defaults_keep_engine_defaults():
    args = build_parser().parse_args([])
    assert engine_config_from_args(args) == EngineConfig()
    s = settings_from_args(args)
    assert s.api_key is None and s.served_model_names == () and s.max_body_bytes == 8 * 1024 * 1024
    assert (args.host, args.port, args.loop, args.http) == ("127.0.0.1", 8000, "uvloop", "httptools")


def test_flags_reach_the_configs(monkeypatch):
    monkeypatch.delenv("RTSERVE_API_KEY", raising=False)
    args = build_parser().parse_args([
        "--model", "/m.gguf", "--max-tokens-cap", "100", "--max-n", "2", "--max-model-len", "1024",
        "--num-blocks", "64", "--no-prefix-caching", "--api-key", "k", "--served-model-name", "a", "b",
        "--max-body-bytes", "1000", "--num-threads", "2"])
    cfg = engine_config_from_args(args)
    assert cfg.model == "/m.gguf" and cfg.num_threads == 2
    assert (cfg.limits.max_tokens_cap, cfg.limits.max_n) == (100, 2)
    assert cfg.scheduler.max_model_len == 1024
    assert cfg.cache.num_blocks == 64 and cfg.cache.enable_prefix_caching is False
    s = settings_from_args(args)
    assert (s.api_key, s.served_model_names, s.max_body_bytes) == ("k", ("a", "b"), 1000)


def test_bad_flag_exits():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--port", "x"])


def test_soft_overload_flags_reach_the_rt_config():
    args = build_parser().parse_args(["--rt-soft-overload", "reject", "--rt-soft-overload-bound-ms", "250"])
    rt = engine_config_from_args(args).rt
    assert (rt.soft_overload, rt.soft_overload_bound_s) == ("reject", 0.25)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--rt-soft-overload", "drop"])
