"""`rtserve` command line: dispatches to subcommands, each owning its own argument parser."""
from __future__ import annotations

import sys

USAGE = """usage: rtserve {serve,bench,generate,chat,batch,models} [options]

  serve      start the OpenAI/Anthropic-compatible server
  bench      SLO load generator against any OpenAI-compatible server
  generate   one-shot offline generation on the local model
  chat       terminal chat with a running server (any OpenAI-compatible one)
  batch      submit and follow batches (/v1/files + /v1/batches) on a running server
  models     list the models available here (architecture, quantization, size, context length)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from rtserve.api.server import main as serve_main
        return serve_main(rest)
    if command == "bench":
        from rtserve.bench.cli import main as bench_main
        return bench_main(rest)
    if command == "generate":
        from rtserve.offline_cli import main as generate_main
        return generate_main(rest)
    if command == "chat":
        from rtserve.chat.cli import main as chat_main
        return chat_main(rest)
    if command == "batch":
        from rtserve.api.batches.cli import main as batch_main
        return batch_main(rest)
    if command == "models":
        from rtserve.models_cli import main as models_main
        return models_main(rest)
    print(f"rtserve: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
