"""`rtserve batch`: submit and follow OpenAI-style batches on any server with /v1/files and /v1/batches.

    rtserve batch submit FILE.jsonl [--endpoint E] [--wait] [--output OUT.jsonl] [--errors ERR.jsonl]
    rtserve batch status ID | list [--limit N] | cancel ID | results ID [--output OUT.jsonl]

The server is --base-url (default $RTSERVE_BASE_URL, else http://127.0.0.1:8000) with --api-key (default
$RTSERVE_API_KEY, else $OPENAI_API_KEY). `--wait` shows a progress bar until the batch ends; the exit
status is 0 only when it completed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import httpx

ENDED = ("completed", "failed", "expired", "cancelled")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtserve batch", description="OpenAI-style batches against a server.")
    p.add_argument("--base-url", default=os.environ.get("RTSERVE_BASE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", default=os.environ.get("RTSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--poll-s", type=float, default=1.0, help="how often --wait asks for the batch's status")
    sub = p.add_subparsers(dest="command", required=True)
    submit = sub.add_parser("submit", help="upload a JSONL file and start a batch on it")
    submit.add_argument("file")
    submit.add_argument("--endpoint", default=None, help="default: the `url` of the file's first line")
    submit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--wait", action="store_true", help="follow the batch with a progress bar until it ends")
    submit.add_argument("--output", default=None, help="with --wait: write the output file here")
    submit.add_argument("--errors", default=None, help="with --wait: write the error file here")
    for name in ("status", "cancel"):
        sub.add_parser(name).add_argument("batch_id")
    listing = sub.add_parser("list")
    listing.add_argument("--limit", type=int, default=20)
    results = sub.add_parser("results", help="the output (and error) file of an ended batch")
    results.add_argument("batch_id")
    results.add_argument("--output", default=None, help="default: standard output")
    results.add_argument("--errors", default=None, help="write the error file here (default: standard error)")
    return p


class BatchClient:
    def __init__(self, base_url: str, api_key: str | None) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=60.0)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        r = self.http.request(method, path, **kwargs)
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:300]
            raise SystemExit(f"rtserve batch: {method} {path} -> HTTP {r.status_code}: {message}")
        return r

    def submit(self, path: str, endpoint: str, metadata: dict[str, str]) -> dict[str, Any]:
        with open(path, "rb") as f:
            file_id = self.call("POST", "/v1/files", data={"purpose": "batch"},
                                files={"file": (os.path.basename(path), f)}).json()["id"]
        body: dict[str, Any] = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
        if metadata:
            body["metadata"] = metadata
        return self.call("POST", "/v1/batches", json=body).json()

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/batches/{batch_id}").json()

    def content(self, file_id: str) -> bytes:
        return self.call("GET", f"/v1/files/{file_id}/content").content


def first_url(path: str) -> str:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)["url"]
                except (ValueError, KeyError, TypeError):
                    break
    raise SystemExit("rtserve batch: give --endpoint (the file's first line has no `url`)")


def follow(client: BatchClient, batch: dict[str, Any], poll_s: float) -> dict[str, Any]:
    """Poll until the batch ends, with a rich progress bar on standard error."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(batch["status"], total=None)
        while batch["status"] not in ENDED:
            time.sleep(poll_s)
            batch = client.batch(batch["id"])
            counts = batch["request_counts"]
            bar.update(task, description=batch["status"], total=counts["total"] or None,
                       completed=counts["completed"] + counts["failed"])
        counts = batch["request_counts"]
        bar.update(task, description=batch["status"], total=counts["total"] or 1,
                   completed=counts["completed"] + counts["failed"])
    return batch


def write_results(client: BatchClient, batch: dict[str, Any], output: str | None, errors: str | None) -> None:
    for file_id, dest, default in ((batch.get("output_file_id"), output, sys.stdout),
                                   (batch.get("error_file_id"), errors, sys.stderr)):
        if not file_id:
            continue
        data = client.content(file_id)
        if dest:
            with open(dest, "wb") as f:
                f.write(data)
        else:
            default.write(data.decode("utf-8", errors="replace"))
            default.flush()


def print_json(body: Any) -> None:
    print(json.dumps(body, indent=2))


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    client = BatchClient(args.base_url, args.api_key)
    if args.command == "submit":
        metadata = dict(item.split("=", 1) for item in args.metadata if "=" in item)
        batch = client.submit(args.file, args.endpoint or first_url(args.file), metadata)
        print(batch["id"])
        if not args.wait:
            return 0
        batch = follow(client, batch, args.poll_s)
        if batch["status"] == "failed":
            print_json(batch["errors"])
        elif args.output or args.errors:
            write_results(client, batch, args.output, args.errors)
        counts = batch["request_counts"]
        print(f"{batch['id']}: {batch['status']}, {counts['completed']} completed, {counts['failed']} failed "
              f"of {counts['total']}", file=sys.stderr)
        return 0 if batch["status"] == "completed" else 1
    if args.command == "status":
        print_json(client.batch(args.batch_id))
    elif args.command == "cancel":
        print_json(client.call("POST", f"/v1/batches/{args.batch_id}/cancel").json())
    elif args.command == "list":
        for b in client.call("GET", "/v1/batches", params={"limit": args.limit}).json()["data"]:
            counts = b["request_counts"]
            print(f"{b['id']}  {b['status']:<11} {counts['completed']}/{counts['total']} completed  "
                  f"{counts['failed']} failed  {b['endpoint']}")
    elif args.command == "results":
        batch = client.batch(args.batch_id)
        if batch["status"] not in ENDED:
            print(f"rtserve batch: {args.batch_id} is {batch['status']}; its results are not ready", file=sys.stderr)
            return 1
        write_results(client, batch, args.output, args.errors)
    return 0
