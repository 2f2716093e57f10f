"""BatchStore on a real SQLite file: WAL mode, commits visible to a second connection, results written
once, paging, finalization replacing (never duplicating) its files, retention archiving."""
from __future__ import annotations

import json
import os
import sqlite3

from rtserve.api.batches.store import BatchStore


def batch_row(batch_id: str, owner: str = "o", status: str = "in_progress") -> dict:
    return {"id": batch_id, "owner": owner, "api": "openai", "endpoint": "/v1/completions",
            "completion_window": "24h", "status": status, "created_at": 100, "expires_at": 200}


def make(tmp_path) -> BatchStore:
    return BatchStore(str(tmp_path / "db.sqlite3"), str(tmp_path / "files"))


def test_wal_and_commits_are_visible_to_another_connection(tmp_path):
    store = make(tmp_path)
    store.add_batch(batch_row("batch_a"), [("x", "{}"), ("y", "{}")])
    other = sqlite3.connect(str(tmp_path / "db.sqlite3"))
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("SELECT COUNT(*) FROM items WHERE batch_id = 'batch_a'").fetchone()[0] == 2
    assert store.record_result("batch_a", 0, "succeeded", 200, "r", {"ok": 1}, (3, 2, 1))
    assert other.execute("SELECT state FROM items WHERE idx = 0").fetchone()[0] == "succeeded"


def test_a_result_is_written_only_over_a_pending_item(tmp_path):
    store = make(tmp_path)
    store.add_batch(batch_row("batch_a"), [("x", "{}"), ("y", "{}")])
    assert store.record_result("batch_a", 0, "succeeded", 200, "r1", {"n": 1})
    assert not store.record_result("batch_a", 0, "errored", 500, "r2", {"n": 2})
    assert store.settle_pending("batch_a", "cancelled") == 1
    assert not store.record_result("batch_a", 1, "succeeded", 200, "r3", {"n": 3})
    items = list(store.iter_items("batch_a"))
    assert [(i["state"], i["request_id"]) for i in items] == [("succeeded", "r1"), ("cancelled", None)]
    assert store.item_counts("batch_a") == {"pending": 0, "succeeded": 1, "errored": 0, "cancelled": 1,
                                            "expired": 0}


def test_reopened_store_keeps_everything(tmp_path):
    store = make(tmp_path)
    store.add_batch(batch_row("batch_a"), [(f"c{i}", "{}") for i in range(5)])
    store.record_result("batch_a", 2, "succeeded", 200, "r", {"n": 2}, (7, 1, 0))
    store.close()
    again = make(tmp_path)
    assert [r["idx"] for r in again.pending_items("batch_a", 10, exclude={0})] == [1, 3, 4]
    assert again.usage_totals("batch_a") == {"input_tokens": 7, "output_tokens": 1, "cached_tokens": 0}
    assert again.active_batch_ids() == ["batch_a"]


def test_iter_items_pages_in_input_order(tmp_path):
    store = make(tmp_path)
    store.add_batch(batch_row("batch_a"), [(f"c{i}", "{}") for i in range(7)])
    assert [i["custom_id"] for i in store.iter_items("batch_a", page_size=3)] == [f"c{i}" for i in range(7)]


def test_list_batches_cursor_pages(tmp_path):
    store = make(tmp_path)
    for i in range(5):
        store.add_batch(batch_row(f"batch_{i}"))
    store.add_batch(batch_row("batch_other", owner="someone else"))
    page, more = store.list_batches("o", "openai", None, None, 2)
    assert [r["id"] for r in page] == ["batch_4", "batch_3"] and more
    page, more = store.list_batches("o", "openai", "batch_3", None, 2)
    assert [r["id"] for r in page] == ["batch_2", "batch_1"] and more
    page, more = store.list_batches("o", "openai", "batch_1", None, 2)
    assert [r["id"] for r in page] == ["batch_0"] and not more
    page, _ = store.list_batches("o", "openai", None, "batch_1", 2)
    assert [r["id"] for r in page] == ["batch_3", "batch_2"]


def test_finalize_twice_replaces_its_file_rows(tmp_path):
    store = make(tmp_path)
    store.add_batch(batch_row("batch_a", status="finalizing"), [("x", "{}")])
    row = {"id": "file-aoutput", "owner": "o", "purpose": "batch_output", "filename": "f", "bytes": 1,
           "created_at": 1, "expires_at": 9}
    store.finalize("batch_a", "completed", [row], 150, output_file_id="file-aoutput")
    store.finalize("batch_a", "completed", [{**row, "bytes": 2}], 151, output_file_id="file-aoutput")
    files, _ = store.list_files("o", None, None, 10, True)
    assert [(f["id"], f["bytes"]) for f in files] == [("file-aoutput", 2)]
    batch = store.get_batch("batch_a")
    assert (batch["status"], batch["completed_at"], batch["ended_at"]) == ("completed", 151, 151)
    assert store.active_batch_ids() == []


def test_delete_file_frees_its_bytes_and_orphans_are_removed(tmp_path):
    store = make(tmp_path)
    size = store.write_file_bytes("file-1", iter([b"abc", b"def"]))
    store.add_file({"id": "file-1", "owner": "o", "purpose": "batch", "filename": "in.jsonl", "bytes": size,
                    "created_at": 1, "expires_at": 5})
    store.write_file_bytes("file-orphan", iter([b"x"]))
    assert store.remove_orphan_bytes() == 1
    assert os.listdir(store.files_dir) == ["file-1"]
    assert store.files_expired(5) == ["file-1"]
    assert not store.delete_file("file-1", owner="not the owner")
    assert store.delete_file("file-1", owner="o")
    assert os.listdir(store.files_dir) == [] and store.get_file("file-1", "o") is None


def test_archive_drops_results(tmp_path):
    store = make(tmp_path)
    store.add_batch(batch_row("batch_a"), [("x", "{}")])
    store.record_result("batch_a", 0, "succeeded", 200, "r", {"big": "x" * 1000})
    store.finalize("batch_a", "completed", [], 150)
    assert [b["id"] for b in store.ended_before(151)] == ["batch_a"]
    store.archive_batch("batch_a", 160)
    store.reclaim_space()
    assert list(store.iter_items("batch_a")) == [] and store.get_batch("batch_a")["archived_at"] == 160
    assert store.ended_before(1000) == []
    assert json.loads(json.dumps(store.get_batch("batch_a")))["status"] == "completed"
