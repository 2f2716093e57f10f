"""`rtserve models [PATH ...]`: the models available here, with architecture, quantization, size and
context length: the embedded SmolLM2, installed model packages, and each GGUF file or HF directory
given. A path that cannot be served (missing, truncated, unsupported architecture or quantization)
is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from rtserve.model.catalog import ModelInfo, describe, installed_packages, resolve_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtserve models", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", metavar="PATH", help="GGUF files or HF model directories to describe")
    p.add_argument("--json", action="store_true", help="one JSON object per model instead of a table")
    p.add_argument("--cache-dir", default="", help="where model packages are assembled (default ~/.cache/rtserve)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    rows: list[ModelInfo] = []
    errors: list[str] = []
    sources = [(dist, True) for dist in installed_packages()] + [(path, False) for path in args.paths]
    for source, is_package in sources:
        try:
            path = resolve_model(source, args.cache_dir) if is_package else source
            rows.append(describe(path, source if is_package else ""))
        except (OSError, ValueError) as exc:
            line = _one_line(exc)
            errors.append(f"rtserve models: {line if source in line else f'{source}: {line}'}")
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
    elif rows:
        print(format_table(rows))
    for line in errors:
        print(line, file=sys.stderr)
    return 2 if errors else 0


def format_table(rows: list[ModelInfo]) -> str:
    header = ("NAME", "ARCHITECTURE", "QUANTIZATION", "SIZE", "CONTEXT", "PATH")
    cells = [header] + [(r.name, r.architecture, r.quantization, _size(r.size_bytes), str(r.context_length),
                         r.path) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in cells)


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return ""


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    return " ".join(text.split())
