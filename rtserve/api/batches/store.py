"""Durable state of the Batch API: one SQLite database (WAL, synchronous=FULL) plus file bodies on disk.

Tables:
    files    one row per stored file (uploaded inputs, generated output/error files); its bytes live in
             `<data_dir>/files/<id>`, written and fsynced before the row is committed.
    batches  one row per batch (OpenAI or Anthropic); `status` uses OpenAI's names for both APIs.
    items    one row per request of a batch: `state` is pending until its result is committed, then
             succeeded | errored | cancelled | expired. A result is written only over a pending row, so
             an item answered once is never answered (or run) again, even across restarts.

Every method commits before it returns, so a caller that acknowledges after a call acknowledges only what
is on disk. Methods are synchronous and serialised by a lock; the routes and the runner call them through
`asyncio.to_thread` so that an fsync never stalls the event loop.
"""
from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
ENDED_STATUSES = ("completed", "failed", "expired", "cancelled")
ITEM_STATES = ("pending", "succeeded", "errored", "cancelled", "expired")

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,
    purpose TEXT NOT NULL, filename TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
    expires_at INTEGER);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL, api TEXT NOT NULL,
    endpoint TEXT NOT NULL, input_file_id TEXT, completion_window TEXT NOT NULL, status TEXT NOT NULL,
    model TEXT, metadata TEXT, errors TEXT, output_file_id TEXT, error_file_id TEXT,
    created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, in_progress_at INTEGER, finalizing_at INTEGER,
    completed_at INTEGER, failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    ended_at INTEGER, archived_at INTEGER, output_expires_s INTEGER);
CREATE TABLE IF NOT EXISTS items (
    batch_id TEXT NOT NULL, idx INTEGER NOT NULL, custom_id TEXT NOT NULL, body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', status_code INTEGER, request_id TEXT, result TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_by_state ON items (batch_id, state, idx);
CREATE INDEX IF NOT EXISTS batches_by_status ON batches (status, seq);
"""


def _exclusive_lock(path: str) -> IO[bytes]:
    """Hold an advisory lock for this process's lifetime: two servers on one data directory would both
    run its batches. The kernel drops the lock when the process dies, SIGKILL included."""
    f = open(path, "ab")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise RuntimeError(f"the batch data directory {os.path.dirname(path) or '.'} is in use by another "
                           "rtserve process (give each server its own --data-dir)") from None
    return f


class BatchStore:
    """The SQLite database and the file directory; see the module docstring for the tables."""

    def __init__(self, db_path: str, files_dir: str) -> None:
        os.makedirs(files_dir, exist_ok=True)
        self.files_dir = files_dir
        self._lock_file = _exclusive_lock(db_path + ".lock")
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # effective on a new database only
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, not only a crash
        self._conn.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        self._lock_file.close()  # releases the process lock

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._conn.execute(sql, args).fetchall()]

    # ---- files --------------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> str:
        return os.path.join(self.files_dir, file_id)

    def write_file_bytes(self, file_id: str, chunks: Iterator[bytes]) -> int:
        """Write a file body (temp name, fsync, rename, fsync the directory); returns its size. The row is
        added separately, after this returns."""
        path = self.file_path(file_id)
        tmp, num_bytes = path + ".tmp", 0
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                num_bytes += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(self.files_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power loss
        finally:
            os.close(dir_fd)
        return num_bytes

    def add_file(self, row: dict[str, Any]) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO files (id, owner, purpose, filename, bytes, created_at, expires_at) "
                      "VALUES (:id, :owner, :purpose, :filename, :bytes, :created_at, :expires_at)", row)

    def get_file(self, file_id: str, owner: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM files WHERE id = ? AND owner = ?", (file_id, owner))
        return rows[0] if rows else None

    def list_files(self, owner: str, purpose: str | None, after: str | None, limit: int,
                   descending: bool) -> tuple[list[dict[str, Any]], bool]:
        """A page of files in creation order (newest first when `descending`) after the cursor id."""
        cmp, order = ("<", "DESC") if descending else (">", "ASC")
        sql, args = "SELECT * FROM files WHERE owner = ?", [owner]
        if purpose:
            sql, args = sql + " AND purpose = ?", args + [purpose]
        if after:
            sql += f" AND seq {cmp} COALESCE((SELECT seq FROM files WHERE id = ?), seq)"
            args.append(after)
        rows = self._query(sql + f" ORDER BY seq {order} LIMIT ?", (*args, limit + 1))
        return rows[:limit], len(rows) > limit

    def delete_file(self, file_id: str, owner: str | None = None) -> bool:
        """Delete the row (committed), then the bytes. `owner=None` deletes whoever owns it."""
        with self._tx() as c:
            if owner is None:
                n = c.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
            else:
                n = c.execute("DELETE FROM files WHERE id = ? AND owner = ?", (file_id, owner)).rowcount
        if n:
            try:
                os.unlink(self.file_path(file_id))
            except FileNotFoundError:
                pass
        return bool(n)

    def remove_orphan_bytes(self) -> int:
        """Delete file bodies with no row (an upload interrupted between the fsync and the commit)."""
        known = {r["id"] for r in self._query("SELECT id FROM files")}
        removed = 0
        for name in os.listdir(self.files_dir):
            if name.endswith(".tmp") or name not in known:
                os.unlink(os.path.join(self.files_dir, name))
                removed += 1
        return removed

    # ---- batches ------------------------------------------------------------------------------------

    def add_batch(self, row: dict[str, Any], items: list[tuple[str, str]] | None = None) -> None:
        """Insert a batch and, when given, its items `(custom_id, body_json)` in one transaction."""
        cols = ", ".join(row)
        with self._tx() as c:
            c.execute(f"INSERT INTO batches ({cols}) VALUES ({', '.join(':' + k for k in row)})", row)
            if items:
                self._insert_items(c, row["id"], items)

    @staticmethod
    def _insert_items(c: sqlite3.Connection, batch_id: str, items: list[tuple[str, str]]) -> None:
        c.executemany("INSERT INTO items (batch_id, idx, custom_id, body) VALUES (?, ?, ?, ?)",
                      ((batch_id, i, cid, body) for i, (cid, body) in enumerate(items)))

    def start_batch(self, batch_id: str, items: list[tuple[str, str]], model: str | None, now: int) -> None:
        """validating -> in_progress with its items, in one transaction."""
        with self._tx() as c:
            if c.execute("UPDATE batches SET status = 'in_progress', in_progress_at = ?, model = ? "
                         "WHERE id = ? AND status = 'validating'", (now, model, batch_id)).rowcount:
                self._insert_items(c, batch_id, items)  # not when cancelled while validating

    def update_batch(self, batch_id: str, when_status: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """Set fields (JSON-encoding dicts/lists); only while the status is one of `when_status`."""
        values = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in fields.items()}
        sql = f"UPDATE batches SET {', '.join(f'{k} = :{k}' for k in values)} WHERE id = :_id"
        if when_status:
            sql += f" AND status IN ({', '.join(repr(s) for s in when_status)})"
        with self._tx() as c:
            return c.execute(sql, {**values, "_id": batch_id}).rowcount > 0

    def get_batch(self, batch_id: str, owner: str | None = None, api: str | None = None) -> dict[str, Any] | None:
        sql, args = "SELECT * FROM batches WHERE id = ?", [batch_id]
        if owner is not None:
            sql, args = sql + " AND owner = ?", args + [owner]
        if api is not None:
            sql, args = sql + " AND api = ?", args + [api]
        rows = self._query(sql, tuple(args))
        return rows[0] if rows else None

    def list_batches(self, owner: str, api: str, after: str | None, before: str | None,
                     limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Newest first. `after` pages to older batches; `before` to newer ones (returned newest first)."""
        sql, args = "SELECT * FROM batches WHERE owner = ? AND api = ?", [owner, api]
        order = "DESC"
        if after:
            sql, args = sql + " AND seq < COALESCE((SELECT seq FROM batches WHERE id = ?), seq)", args + [after]
        if before:
            sql, args = sql + " AND seq > COALESCE((SELECT seq FROM batches WHERE id = ?), seq)", args + [before]
            order = "ASC"
        rows = self._query(sql + f" ORDER BY seq {order} LIMIT ?", (*args, limit + 1))
        page, has_more = rows[:limit], len(rows) > limit
        return (page[::-1] if order == "ASC" else page), has_more

    def delete_batch(self, batch_id: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM items WHERE batch_id = ?", (batch_id,))
            c.execute("DELETE FROM batches WHERE id = ?", (batch_id,))

    def active_batch_ids(self) -> list[str]:
        marks = ", ".join("?" * len(ACTIVE_STATUSES))
        return [r["id"] for r in self._query(f"SELECT id FROM batches WHERE status IN ({marks}) ORDER BY seq",
                                             ACTIVE_STATUSES)]

    def ended_before(self, cutoff: int) -> list[dict[str, Any]]:
        """Ended, not yet archived batches that ended before `cutoff` (retention)."""
        return self._query("SELECT * FROM batches WHERE ended_at IS NOT NULL AND ended_at < ? "
                           "AND archived_at IS NULL", (cutoff,))

    def files_expired(self, now: int) -> list[str]:
        return [r["id"] for r in self._query("SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?",
                                             (now,))]

    def archive_batch(self, batch_id: str, now: int) -> None:
        """Past retention: drop the batch's items (its results) and mark it archived."""
        with self._tx() as c:
            c.execute("DELETE FROM items WHERE batch_id = ?", (batch_id,))
            c.execute("UPDATE batches SET archived_at = ? WHERE id = ?", (now, batch_id))

    def reclaim_space(self) -> None:
        with self._lock:
            self._conn.execute("PRAGMA incremental_vacuum")
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # ---- items --------------------------------------------------------------------------------------

    def pending_items(self, batch_id: str, limit: int, exclude: set[int]) -> list[dict[str, Any]]:
        rows = self._query("SELECT idx, custom_id, body FROM items WHERE batch_id = ? AND state = 'pending' "
                           "ORDER BY idx LIMIT ?", (batch_id, limit + len(exclude)))
        return [r for r in rows if r["idx"] not in exclude][:limit]

    def record_result(self, batch_id: str, idx: int, state: str, status_code: int | None,
                      request_id: str | None, result: dict[str, Any] | None,
                      usage: tuple[int, int, int] = (0, 0, 0)) -> bool:
        """Commit one item's result; False when it was no longer pending (already answered, cancelled)."""
        with self._tx() as c:
            return c.execute(
                "UPDATE items SET state = ?, status_code = ?, request_id = ?, result = ?, input_tokens = ?, "
                "output_tokens = ?, cached_tokens = ? WHERE batch_id = ? AND idx = ? AND state = 'pending'",
                (state, status_code, request_id, None if result is None else json.dumps(result), *usage,
                 batch_id, idx)).rowcount > 0

    def settle_pending(self, batch_id: str, state: str, exclude: set[int] = frozenset()) -> int:
        """Every still-pending item of the batch but `exclude` (those in flight) becomes `state`."""
        with self._tx() as c:
            return c.execute(f"UPDATE items SET state = ? WHERE batch_id = ? AND state = 'pending' "
                             f"AND idx NOT IN ({', '.join(str(int(i)) for i in exclude)})",
                             (state, batch_id)).rowcount

    def item_counts(self, batch_id: str) -> dict[str, int]:
        counts = dict.fromkeys(ITEM_STATES, 0)
        for r in self._query("SELECT state, COUNT(*) AS n FROM items WHERE batch_id = ? GROUP BY state", (batch_id,)):
            counts[r["state"]] = r["n"]
        return counts

    def usage_totals(self, batch_id: str) -> dict[str, int]:
        rows = self._query("SELECT COALESCE(SUM(input_tokens), 0) AS i, COALESCE(SUM(output_tokens), 0) AS o, "
                           "COALESCE(SUM(cached_tokens), 0) AS c FROM items WHERE batch_id = ?", (batch_id,))
        return {"input_tokens": rows[0]["i"], "output_tokens": rows[0]["o"], "cached_tokens": rows[0]["c"]}

    def items_page(self, batch_id: str, after_idx: int, limit: int) -> list[dict[str, Any]]:
        return self._query("SELECT idx, custom_id, state, status_code, request_id, result FROM items "
                           "WHERE batch_id = ? AND idx > ? ORDER BY idx LIMIT ?", (batch_id, after_idx, limit))

    def iter_items(self, batch_id: str, page_size: int = 500) -> Iterator[dict[str, Any]]:
        """Every item in input order, read in pages (a large batch is never held in memory at once)."""
        last = -1
        while True:
            rows = self.items_page(batch_id, last, page_size)
            yield from rows
            if len(rows) < page_size:
                return
            last = rows[-1]["idx"]

    def finalize(self, batch_id: str, final_status: str, files: list[dict[str, Any]], now: int,
                 **fields: Any) -> None:
        """Register the output/error files and end the batch, in one transaction (idempotent on restart)."""
        with self._tx() as c:
            for row in files:
                c.execute("INSERT OR REPLACE INTO files (id, owner, purpose, filename, bytes, created_at, expires_at) "
                          "VALUES (:id, :owner, :purpose, :filename, :bytes, :created_at, :expires_at)", row)
            values = {"status": final_status, f"{final_status}_at": now, "ended_at": now, **fields}
            sets = ", ".join(f"{k} = :{k}" for k in values)
            c.execute(f"UPDATE batches SET {sets} WHERE id = :_id", {**values, "_id": batch_id})
