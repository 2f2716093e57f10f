"""`rtserve serve --api-key-file`: keys one per line beside --api-key; unreadable or empty files refused;
--max-concurrent-per-key reaches the settings."""
from __future__ import annotations

import pytest

from rtserve.api.server import build_parser, settings_from_args


def test_keys_from_a_file_join_the_flag(tmp_path, monkeypatch):
    monkeypatch.delenv("RTSERVE_API_KEY", raising=False)
    path = tmp_path / "keys"
    path.write_text("# team keys\nkey-one\n\n  key-two  \n")
    s = settings_from_args(build_parser().parse_args(["--api-key", "k", "--api-key-file", str(path),
                                                      "--max-concurrent-per-key", "3", "--no-batch-api"]))
    assert s.all_api_keys == ("k", "key-one", "key-two") and s.max_concurrent_per_key == 3
    alone = settings_from_args(build_parser().parse_args(["--api-key-file", str(path), "--no-batch-api"]))
    assert alone.all_api_keys == ("key-one", "key-two")


@pytest.mark.parametrize("content", [None, "", "# only a comment\n\n"])
def test_missing_or_empty_file_is_refused(tmp_path, content):
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match="--api-key-file"):
        settings_from_args(build_parser().parse_args(["--api-key-file", str(path), "--no-batch-api"]))
