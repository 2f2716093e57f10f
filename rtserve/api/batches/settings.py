"""Settings of the Batch API (OpenAI Files + Batches, Anthropic Message Batches)."""
from __future__ import annotations

import os
from dataclasses import dataclass

DAY_S = 24 * 3600


def default_data_dir() -> str:
    """Per-user data directory: $RTSERVE_DATA_DIR, else $XDG_DATA_HOME/rtserve, else ~/.local/share/rtserve."""
    if os.environ.get("RTSERVE_DATA_DIR"):
        return os.environ["RTSERVE_DATA_DIR"]
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "rtserve")


@dataclass(frozen=True)
class BatchSettings:
    data_dir: str
    max_file_bytes: int = 200 * 1024 * 1024      # larger uploads get 413
    max_batch_requests: int = 50_000             # more lines (or Anthropic requests) get 400
    # Batch items submitted to the engine at once: its default sequence slots, which batch work fills
    # when no interactive request runs (the engine holds or preempts it for interactive work).
    max_in_flight: int = 64
    retention_s: float = 30 * DAY_S              # files and finished batches' results are kept this long
    completion_window_s: float = DAY_S           # "24h", the only window OpenAI and Anthropic offer
    sweep_interval_s: float = 60.0               # how often expiry and retention are checked when idle
    retry_backoff_s: float = 1.0                 # wait before resubmitting an item refused with 429/503

    def __post_init__(self) -> None:
        if not self.data_dir:
            raise ValueError("BatchSettings.data_dir must be a directory path")
        if self.max_file_bytes <= 0 or self.max_batch_requests <= 0 or self.max_in_flight <= 0:
            raise ValueError("max_file_bytes, max_batch_requests and max_in_flight must be > 0")
        if self.retention_s <= 0 or self.completion_window_s <= 0 or self.sweep_interval_s <= 0:
            raise ValueError("retention_s, completion_window_s and sweep_interval_s must be > 0")

    @property
    def db_path(self) -> str:
        return os.path.join(self.data_dir, "batches.sqlite3")

    @property
    def files_dir(self) -> str:
        return os.path.join(self.data_dir, "files")
